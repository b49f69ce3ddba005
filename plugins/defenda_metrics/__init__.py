"""Built-in metrics (a plugin package registered through the 'defenda' entry-point group).

Each metric receives the truth ``(x, y)`` and a reconstruction already matched row by
row (see :func:`defenda.metrics.apply_matching`), all in model space, and scores them
with :mod:`defenda.metrics`. Heavy imports happen inside ``compute``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar

from defenda import Metric, Reconstruction, TaskData, hookimpl, param

if TYPE_CHECKING:
    import torch


def _unit_pair(x: torch.Tensor, recon: Reconstruction, data: TaskData) -> tuple[torch.Tensor, torch.Tensor]:
    """Truth and reconstruction as float64 unit-space images clamped to [0, 1]."""
    from defenda.metrics import unit_images

    return unit_images(x, data), unit_images(recon.inputs.to(x.device), data)


class PSNR(Metric):
    """Peak signal-to-noise ratio in dB (MAX = 1, images clamped to [0, 1], mean of per-image values)."""

    name: ClassVar[str] = "psnr"
    columns: ClassVar[tuple[str, ...]] = ("psnr",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import psnr

        return {"psnr": psnr(*_unit_pair(x, recon, data))}


class SSIM(Metric):
    """Structural similarity (Wang et al. 2004: Gaussian σ 1.5, 11 taps; mean over images)."""

    name: ClassVar[str] = "ssim"
    columns: ClassVar[tuple[str, ...]] = ("ssim",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import ssim

        return {"ssim": ssim(*_unit_pair(x, recon, data))}


class LPIPS(Metric):
    """Learned perceptual distance (lpips package, AlexNet v0.1); empty when the AlexNet weights are missing."""

    name: ClassVar[str] = "lpips"
    columns: ClassVar[tuple[str, ...]] = ("lpips",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image"})

    @dataclass(frozen=True)
    class Params:
        backbone_path: str = param(
            "",
            "AlexNet checkpoint (torchvision's alexnet-owt-7be5be79.pth); empty: "
            "$DEFENDA_LPIPS_BACKBONE or the torch hub cache. Never downloaded.",
        )

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import lpips_distance

        a, b = _unit_pair(x, recon, data)
        return {"lpips": lpips_distance(a, b, backbone_path=self.params.backbone_path or None)}


class LabelAccuracy(Metric):
    """Fraction of labels recovered (empty when the attack does not return labels)."""

    name: ClassVar[str] = "label-acc"
    columns: ClassVar[tuple[str, ...]] = ("label_acc",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image", "tabular"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import label_accuracy

        return {"label_acc": label_accuracy(y, recon.labels)}


class MSE(Metric):
    """Mean squared error per sample, averaged: images in [0, 1]; tabular data on standardised features."""

    name: ClassVar[str] = "mse"
    columns: ClassVar[tuple[str, ...]] = ("mse",)
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image", "tabular"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import blank_non_finite, mse

        if data.kind == "image":
            return {"mse": mse(*_unit_pair(x, recon, data))}
        rec = blank_non_finite(recon.inputs.detach().to(x.device).double())
        return {"mse": mse(x.detach().double(), rec)}


class Tabular(Metric):
    """Tabular reconstruction: MAE on continuous features (standardised), accuracy on discrete ones."""

    name: ClassVar[str] = "tabular"
    columns: ClassVar[tuple[str, ...]] = ("mae", "feature_acc")
    task_kinds: ClassVar[frozenset[str]] = frozenset({"tabular"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        import torch

        from defenda.metrics import feature_accuracy, mae

        discrete = tuple(data.discrete_features)
        rec = recon.inputs.detach().to(x.device)
        supports = [torch.unique(data.to_unit(data.train[0].double())[:, j]) for j in discrete]
        return {
            "mae": mae(x, rec, discrete),
            "feature_acc": feature_accuracy(data.to_unit(x.double()), data.to_unit(rec.double()), discrete, supports)
            if discrete
            else None,
        }


class Success(Metric):
    """Success rates: exact recovery, recognisable, identified among n public candidates (κ = 1/n).

    Fractions of the batch's samples (an unmatched sample fails); thresholds and the
    identification protocol are documented in :mod:`defenda.metrics.success`.
    """

    name: ClassVar[str] = "success"
    columns: ClassVar[tuple[str, ...]] = ("exact_rate", "recognised_rate", "ident_acc")
    task_kinds: ClassVar[frozenset[str]] = frozenset({"image", "tabular"})

    def compute(
        self, x: torch.Tensor, y: torch.Tensor, recon: Reconstruction, data: TaskData
    ) -> dict[str, float | None]:
        from defenda.metrics import success_rates

        return success_rates(x, recon.inputs.detach().to(x.device), data, recon.info)


@hookimpl
def defenda_register_metrics(register: Callable[[type[Metric]], None]) -> None:
    for cls in (PSNR, SSIM, LPIPS, LabelAccuracy, MSE, Tabular, Success):
        register(cls)
