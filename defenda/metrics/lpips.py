"""How close a reconstruction is to the private batch: matching, PSNR, SSIM, LPIPS, …

These are the core functions behind the built-in metric plugins
(``plugins/defenda_metrics``); they follow the conventions of the reference
implementations (see ``reference/attacks.md`` §6).

Spaces
    Image scores (PSNR, SSIM, LPIPS, image MSE) are computed in *unit space*:
    images de-normalised with ``TaskData.to_unit`` and clamped to ``[0, 1]``
    (non-finite values are replaced first: NaN → 0, ±inf → 1/0). Tabular
    scores (MAE, tabular MSE) are computed in *model space*, i.e. on
    standardised features, so that every feature weighs the same; the
    discrete-feature accuracy is computed on raw (unit-space) values.

Batch scores
    Every score is computed per sample, then averaged over the batch (PSNR is
    the mean of per-image PSNRs, not the PSNR of the mean MSE).

Matching (:func:`match`, :func:`apply_matching`)
    Attacks return samples in arbitrary order, and possibly a different
    number B̂ of them than the true batch size B. Reconstructions are paired
    one-to-one with ground-truth samples by a Hungarian assignment
    (``scipy.optimize.linear_sum_assignment``) minimising the total MSE.

    * B̂ < B: the truth samples left without a partner are scored against a
      *blank guess*: all zeros in model space (the data mean: the mean colour
      of each channel for images, the mean of each feature for tabular data)
      with label :data:`UNMATCHED_LABEL` (never correct). A missing sample
      therefore scores what guessing the mean would score — a failure, not
      a hole in the average.
    * B̂ > B: the B reconstructions that match best are kept, the rest are
      ignored (an attacker is not penalised for extra guesses).
    * ``Reconstruction.info`` of the matched copy records ``matched_fraction``
      (matched truth samples / B) and ``num_reconstructed`` (B̂).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from defenda.interfaces import Reconstruction

if TYPE_CHECKING:
    from torch import nn

    from defenda.interfaces import TaskData

__all__ = [
    "ALEXNET_CHECKPOINT",
    "LPIPS_BACKBONE_ENV",
    "LPIPS_MIN_SIDE",
    "LPIPS_UPSAMPLE_SIDE",
    "PSNR_CAP_DB",
    "UNMATCHED_LABEL",
    "LPIPSUnavailableWarning",
    "apply_matching",
    "blank_non_finite",
    "feature_accuracy",
    "label_accuracy",
    "load_lpips",
    "lpips_backbone_status",
    "lpips_distance",
    "lpips_per_image",
    "mae",
    "match",
    "mse",
    "mse_per_image",
    "pairwise_mse",
    "psnr",
    "psnr_per_image",
    "ssim",
    "ssim_per_image",
    "unit_images",
]

#: PSNR reported for a perfect reconstruction. Exact recoveries computed in
#: float64 from float32 inputs land at ~100–300 dB; values are capped here
#: (reached only when the MSE is 0 or below 1e-30), so the column stays finite.
PSNR_CAP_DB = 300.0

#: Label given to the blank guess that stands in for an unmatched truth sample.
UNMATCHED_LABEL = -1

#: torchvision's ImageNet AlexNet checkpoint (``AlexNet_Weights.IMAGENET1K_V1``).
ALEXNET_CHECKPOINT = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_CHECKPOINT}"

#: Environment variable naming the AlexNet checkpoint file for LPIPS.
LPIPS_BACKBONE_ENV = "DEFENDA_LPIPS_BACKBONE"

#: Images whose smaller side is below this are upsampled before LPIPS ...
LPIPS_MIN_SIDE = 32
#: ... bilinearly, so that their smaller side becomes this many pixels.
LPIPS_UPSAMPLE_SIDE = 64


class LPIPSUnavailableWarning(UserWarning):
    """LPIPS cannot be computed (no AlexNet backbone weights); the lpips column is left empty."""


# --------------------------------------------------------------------------- helpers


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim < 1:
        raise ValueError("expected a batch (first dimension = samples)")


def blank_non_finite(x: torch.Tensor) -> torch.Tensor:
    """Model-space values with NaN/±inf replaced by 0, the blank guess (the data mean)."""
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def unit_images(x: torch.Tensor, data: TaskData | None = None) -> torch.Tensor:
    """Images in float64, in unit space, clamped to [0, 1] (NaN → 0, +inf → 1, −inf → 0).

    :param x: a batch; in model space when ``data`` is given, else already in unit space.
    :param data: the task whose ``to_unit`` de-normalises ``x``.
    """
    x = x.detach().to(torch.float64)
    if data is not None:
        x = data.to_unit(x)
    return torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0).clamp(0.0, 1.0)


# --------------------------------------------------------------------------- matching


def pairwise_mse(x_true: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
    """``(B, B̂)`` float64 matrix of per-sample MSEs between truth rows and reconstruction rows.

    Non-finite entries (a diverged reconstruction) become a very large finite cost.
    """
    if x_true.shape[1:] != x_rec.shape[1:]:
        raise ValueError(f"sample shapes differ: {tuple(x_true.shape[1:])} vs {tuple(x_rec.shape[1:])}")
    a = x_true.detach().to(torch.float64).reshape(x_true.shape[0], -1).cpu()
    b = x_rec.detach().to(torch.float64).reshape(x_rec.shape[0], -1).cpu()
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).mean(dim=-1)
    return torch.nan_to_num(cost, nan=1e300, posinf=1e300, neginf=1e300)


def match(x_true: torch.Tensor, x_rec: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one pairing of reconstructions with truth samples minimising the total MSE.

    :param x_true: ``(B, *shape)`` ground truth.
    :param x_rec: ``(B̂, *shape)`` reconstructions; B̂ may differ from B.
    :returns: ``(row_idx, col_idx)`` from ``scipy.optimize.linear_sum_assignment``:
        truth sample ``row_idx[k]`` is paired with reconstruction ``col_idx[k]``;
        ``min(B, B̂)`` pairs, ``row_idx`` sorted ascending.
    """
    from scipy.optimize import linear_sum_assignment

    cost = pairwise_mse(x_true, x_rec).numpy()
    if cost.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def apply_matching(
    x: torch.Tensor,
    y: torch.Tensor,
    recon: Reconstruction,
    *,
    data: TaskData | None = None,
) -> tuple[torch.Tensor, torch.Tensor, Reconstruction]:
    """Reorder a reconstruction so that its row ``i`` is the guess for truth sample ``i``.

    :param x: ``(B, *shape)`` true inputs (model space).
    :param y: ``(B,)`` true labels.
    :param recon: the attack's answer, ``B̂`` rows in any order.
    :param data: when given and the task is an image task, the matching cost is the MSE of
        the clamped unit-space images (the space PSNR is computed in); otherwise model space.
    :returns: ``(x, y, matched)``: the truth unchanged (all B rows, original order) and a
        copy of ``recon`` with exactly B rows. Truth samples left without a partner
        (B̂ < B) get the blank guess (zeros in model space, label :data:`UNMATCHED_LABEL`);
        extra reconstructions (B̂ > B) are dropped. ``matched.info`` gains
        ``matched_fraction`` and ``num_reconstructed``.
    """
    rec = recon.inputs.detach()
    if rec.shape[1:] != x.shape[1:]:
        raise ValueError(
            f"reconstruction samples have shape {tuple(rec.shape[1:])}, expected {tuple(x.shape[1:])}"
        )
    if data is not None and data.kind == "image":
        rows, cols = match(unit_images(x, data), unit_images(rec, data))
    else:
        rows, cols = match(x, rec)
    n = x.shape[0]
    inputs = torch.zeros_like(x, dtype=rec.dtype, device=rec.device)
    rows_t = torch.as_tensor(rows, device=rec.device)
    cols_t = torch.as_tensor(cols, device=rec.device)
    if len(rows):
        inputs[rows_t] = rec[cols_t]
    labels = None
    if recon.labels is not None:
        rec_labels = recon.labels.detach().to(device=y.device).reshape(-1)
        labels = torch.full((n,), UNMATCHED_LABEL, dtype=rec_labels.dtype, device=y.device)
        if len(rows):
            labels[torch.as_tensor(rows, device=y.device)] = rec_labels[torch.as_tensor(cols, device=y.device)]
    info = {**recon.info, "matched_fraction": (len(rows) / n) if n else 0.0, "num_reconstructed": int(rec.shape[0])}
    return x, y, dataclasses.replace(recon, inputs=inputs, labels=labels, info=info)


# --------------------------------------------------------------------------- MSE / PSNR


def mse_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 mean squared error of each sample (over all its elements), as given."""
    _check_pair(a, b)
    d = a.detach().to(torch.float64) - b.detach().to(torch.float64)
    return (d**2).reshape(d.shape[0], -1).mean(dim=1)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the batch of per-sample MSEs, computed on the tensors as given (no clamping)."""
    return float(mse_per_image(a, b).mean())


def psnr_per_image(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float64 PSNR in dB of each image: ``10·log10(1 / MSE)``, MAX = 1.

    Inputs are unit-space images; both are clamped to [0, 1] (see :func:`unit_images`)
    and the MSE is taken over C×H×W. Values are capped at :data:`PSNR_CAP_DB`
    (a zero MSE gives exactly the cap).
    """
    _check_pair(a, b)
    err = mse_per_image(unit_images(a), unit_images(b))
    val = 10.0 * torch.log10(1.0 / err)  # +inf where err == 0
    return val.clamp(max=PSNR_CAP_DB)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Batch PSNR: the mean of :func:`psnr_per_image` (not the PSNR of the mean MSE)."""
    return float(psnr_per_image(a, b).mean())


# --------------------------------------------------------------------------- SSIM


def _ssim_win_size(height: int, width: int) -> int:
    side = min(height, width)
    win = min(11, side if side % 2 == 1 else side - 1)
    return max(win, 1)


def ssim_per_image(a: torch.Tensor, b: torch.Tensor, *, win_size: int | None = None) -> torch.Tensor:
    """``(B,)`` float64 SSIM (Wang et al. 2004) of each unit-space image.

    ``skimage.metrics.structural_similarity(..., data_range=1, channel_axis=0,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` on the images
    clamped to [0, 1]: Gaussian window σ = 1.5 (11 taps), C1 = 0.01², C2 = 0.03², each
    channel's SSIM map averaged after cropping a border of ``(win_size − 1) / 2``
    pixels, then averaged over channels.

    Small images: for images whose smaller side is below 11 (the 8×8 digits),
    ``win_size`` defaults to the largest odd number ≤ that side (7 for 8×8).
    skimage does not shrink the Gaussian (it stays σ = 1.5, 11 taps, with
    reflected borders); ``win_size`` only sets the cropped border, so an 8×8
    image is scored on its central 2×2 positions, whose Gaussian windows span
    the whole image. Images of side ≥ 11 get the standard setting.

    :param a, b: ``(B, C, H, W)`` (or ``(B, H, W)`` for one channel) in unit space.
    :param win_size: override the cropped window size (odd, ≤ the smaller side).
    """
    from skimage.metrics import structural_similarity

    _check_pair(a, b)
    ua, ub = unit_images(a).cpu().numpy(), unit_images(b).cpu().numpy()
    if ua.ndim == 3:
        ua, ub = ua[:, None], ub[:, None]
    if ua.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W) or (B, H, W), got shape {tuple(a.shape)}")
    win = win_size if win_size is not None else _ssim_win_size(ua.shape[2], ua.shape[3])
    out = [
        structural_similarity(
            ia,
            ib,
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            win_size=win,
        )
        for ia, ib in zip(ua, ub)
    ]
    return torch.tensor(out, dtype=torch.float64)


def ssim(a: torch.Tensor, b: torch.Tensor, *, win_size: int | None = None) -> float:
    """Batch SSIM: the mean of :func:`ssim_per_image`."""
    return float(ssim_per_image(a, b, win_size=win_size).mean())


# --------------------------------------------------------------------------- LPIPS

_LPIPS_LOCK = threading.Lock()
_LPIPS_MODELS: dict[tuple[str, str], Any] = {}  # value None: loading failed
_LPIPS_WARNED: set[str] = set()


def _candidate_backbones(backbone_path: str | os.PathLike[str] | None) -> list[Path]:
    if backbone_path:
        return [Path(backbone_path).expanduser()]
    env = os.environ.get(LPIPS_BACKBONE_ENV)
    if env:
        return [Path(env).expanduser()]
    return [Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_CHECKPOINT]


def lpips_backbone_status(backbone_path: str | os.PathLike[str] | None = None) -> tuple[Path | None, str]:
    """Where the AlexNet weights for LPIPS are, or why they are not.

    Looks at ``backbone_path`` if given, else ``$DEFENDA_LPIPS_BACKBONE`` if set, else
    ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (``$TORCH_HOME/hub/…``,
    by default ``~/.cache/torch/hub/checkpoints/…``). Nothing is downloaded.

    :returns: ``(path, "")`` when the file exists, else ``(None, message)`` with a
        one-paragraph explanation of where to put the file.
    """
    candidates = _candidate_backbones(backbone_path)
    for path in candidates:
        if path.is_file():
            return path, ""
    looked = candidates[0]
    how = (
        "the lpips metric's backbone_path" if backbone_path
        else f"${LPIPS_BACKBONE_ENV}" if os.environ.get(LPIPS_BACKBONE_ENV)
        else "the torch hub cache"
    )
    msg = (
        f"LPIPS unavailable: AlexNet backbone weights not found at {looked} ({how}). "
        f"LPIPS is reported as empty (None); it is never computed from a random network. "
        f"To enable it, copy torchvision's {ALEXNET_CHECKPOINT} ({ALEXNET_URL}) to "
        f"{Path(torch.hub.get_dir()) / 'checkpoints'}/, or point ${LPIPS_BACKBONE_ENV} or the "
        f"lpips metric's backbone_path at it."
    )
    return None, msg


def _warn_once(message: str) -> None:
    with _LPIPS_LOCK:
        if message in _LPIPS_WARNED:
            return
        _LPIPS_WARNED.add(message)
    warnings.warn(message, LPIPSUnavailableWarning, stacklevel=3)


def _reset_lpips_state() -> None:
    """Forget cached models and emitted warnings (for tests)."""
    with _LPIPS_LOCK:
        _LPIPS_MODELS.clear()
        _LPIPS_WARNED.clear()


def _load_alexnet_features(model: nn.Module, path: Path) -> None:
    """Copy torchvision AlexNet ``features.*`` weights into an ``lpips.LPIPS`` trunk."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict")
    # lpips splits alexnet.features into slice1..slice5, keeping the index as module name
    modules: dict[str, nn.Module] = {}
    net: nn.Module = model.net  # type: ignore[assignment]  # lpips sets it at runtime
    for slice_name, sl in net.named_children():
        if slice_name.startswith("slice"):
            for idx, module in sl.named_children():
                modules[idx] = module
    expected = {f"{i}.{p}" for i, m in modules.items() for p, _ in m.named_parameters(recurse=False)}
    loaded = set()
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        key = key[len("features."):] if key.startswith("features.") else key
        if key not in expected:
            continue
        idx, pname = key.split(".", 1)
        target = getattr(modules[idx], pname)
        if tuple(target.shape) != tuple(value.shape):
            raise ValueError(f"{path}: '{key}' has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(value)
        loaded.add(key)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(
            f"{path} is not an AlexNet checkpoint: missing features.{missing[0]} (and {len(missing) - 1} more)"
        )


def _build_lpips(backbone: Path | None) -> nn.Module:
    from defenda._torchvision_compat import import_torchvision

    import_torchvision()
    import lpips as lpips_pkg

    # fork_rng: building the (then overwritten) random trunk must not consume the caller's
    # global RNG stream; seeding makes the test-only random backbone deterministic too
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # torchvision's deprecation warning for lpips' alexnet(pretrained=False)
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        # pnet_rand=True: build the trunk without torchvision's download; the linear
        # layers (shipped inside the lpips package) are loaded from its weights/v0.1/alex.pth
        model = lpips_pkg.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    if backbone is not None:
        _load_alexnet_features(model, backbone)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_lpips(
    backbone_path: str | os.PathLike[str] | None = None,
    *,
    allow_random_backbone: bool = False,
    device: str | torch.device = "cpu",
) -> nn.Module | None:
    """The LPIPS(AlexNet, v0.1) model, cached per process, or None when the weights are missing.

    :param backbone_path: AlexNet checkpoint (torchvision's ``alexnet-owt-7be5be79.pth``);
        default: ``$DEFENDA_LPIPS_BACKBONE`` or the torch hub cache (see
        :func:`lpips_backbone_status`).
    :param allow_random_backbone: FOR TESTS ONLY: when the weights are missing, use a
        randomly initialised AlexNet trunk instead of returning None. Its numbers are
        meaningless as LPIPS.
    :param device: where the model lives.
    :returns: the model, or None after warning once per process
        (:class:`LPIPSUnavailableWarning`) that the weights are missing or unusable.
    """
    path, message = lpips_backbone_status(backbone_path)
    if path is None and not allow_random_backbone:
        _warn_once(message)
        return None
    key = (str(path) if path is not None else "<random>", str(torch.device(device)))
    with _LPIPS_LOCK:
        if key in _LPIPS_MODELS:  # a model, or None after a failed load (warned already)
            return _LPIPS_MODELS[key]
    try:
        model = _build_lpips(path)
    except Exception as exc:  # a broken file or install makes LPIPS unavailable, never a wrong number
        what = f"the AlexNet backbone {path}" if path is not None else "the LPIPS model"
        _warn_once(
            f"LPIPS unavailable: cannot load {what}: {type(exc).__name__}: {exc}. "
            "LPIPS is reported as empty (None)."
        )
        model = None
    with _LPIPS_LOCK:
        _LPIPS_MODELS.setdefault(key, model.to(device) if model is not None else None)
        return _LPIPS_MODELS[key]


def _lpips_inputs(x: torch.Tensor) -> torch.Tensor:
    x = unit_images(x).to(torch.float32)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"LPIPS expects images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise ValueError(f"LPIPS expects 1 or 3 channels, got {x.shape[1]}")
    h, w = x.shape[2], x.shape[3]
    if min(h, w) < LPIPS_MIN_SIDE:
        scale = LPIPS_UPSAMPLE_SIDE / min(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x


def lpips_per_image(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    backbone_path: str | os.PathLike[str] | None = None,
    allow_random_backbone: bool = False,
    batch_size: int = 64,
) -> torch.Tensor | None:
    """``(B,)`` float64 LPIPS distance (AlexNet, v0.1) of each unit-space image, or None.

    Images are clamped to [0, 1] and passed with ``normalize=True`` (LPIPS wants
    [−1, 1]). Grayscale images are repeated to 3 channels. Images whose smaller side is
    below :data:`LPIPS_MIN_SIDE` (32) are upsampled bilinearly so that it becomes
    :data:`LPIPS_UPSAMPLE_SIDE` (64): AlexNet's stride-4 first layer and two max-pools
    would otherwise collapse an 8×8 image to nothing. Returns None (after one warning
    per process) when the AlexNet weights are missing; see :func:`load_lpips`.
    """
    _check_pair(a, b)
    model = load_lpips(backbone_path, allow_random_backbone=allow_random_backbone, device=a.device)
    if model is None:
        return None
    ia, ib = _lpips_inputs(a), _lpips_inputs(b)
    out = []
    with torch.no_grad():
        for start in range(0, ia.shape[0], batch_size):
            d = model(ia[start : start + batch_size], ib[start : start + batch_size], normalize=True)
            out.append(d.reshape(-1).to(torch.float64).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def lpips_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    backbone_path: str | os.PathLike[str] | None = None,
    allow_random_backbone: bool = False,
) -> float | None:
    """Batch LPIPS: the mean of :func:`lpips_per_image`, or None when unavailable."""
    vals = lpips_per_image(a, b, backbone_path=backbone_path, allow_random_backbone=allow_random_backbone)
    return None if vals is None else float(vals.mean())


# --------------------------------------------------------------------------- labels and tabular data


def label_accuracy(y_true: torch.Tensor, y_rec: torch.Tensor | None) -> float | None:
    """Fraction of samples whose reconstructed label equals the true one (None without labels).

    Rows are matched beforehand; an unmatched sample's label is :data:`UNMATCHED_LABEL`, never correct.
    """
    if y_rec is None:
        return None
    y_true = y_true.detach().reshape(-1).cpu()
    y_rec = y_rec.detach().reshape(-1).cpu()
    if y_true.shape != y_rec.shape:
        raise ValueError(f"label shapes differ: {tuple(y_true.shape)} vs {tuple(y_rec.shape)}")
    if y_true.numel() == 0:
        return None
    return float((y_true.to(torch.int64) == y_rec.to(torch.int64)).to(torch.float64).mean())


def _continuous(num_features: int, discrete: Sequence[int]) -> list[int]:
    skip = {int(i) % num_features for i in discrete} if num_features else set()
    return [j for j in range(num_features) if j not in skip]


def mae(a: torch.Tensor, b: torch.Tensor, discrete: Sequence[int] = ()) -> float | None:
    """Mean absolute error over the continuous features of tabular samples.

    :param a, b: ``(B, F)`` in *model space* (standardised features: each feature
        weighs the same, and an error of 1 is one standard deviation of that feature).
        Non-finite reconstructed values count as the blank guess 0 (the feature's mean).
    :param discrete: feature indices to leave out (scored by :func:`feature_accuracy`).
    :returns: the mean of ``|a − b|`` over samples and continuous features, or None
        when every feature is discrete.
    """
    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"expected tabular samples (B, F), got shape {tuple(a.shape)}")
    cols = _continuous(a.shape[1], discrete)
    if not cols or a.shape[0] == 0:
        return None
    d = (a.detach().to(torch.float64) - blank_non_finite(b.detach().to(torch.float64)))[:, cols].abs()
    return float(d.mean())


def _snap(x: torch.Tensor, support: torch.Tensor | None) -> torch.Tensor:
    if support is None or support.numel() == 0:
        return torch.round(x)
    support = support.to(x).reshape(-1)
    idx = (x[:, None] - support[None, :]).abs().argmin(dim=1)
    return support[idx]


def feature_accuracy(
    a: torch.Tensor,
    b: torch.Tensor,
    discrete: Sequence[int],
    supports: Sequence[torch.Tensor | None] | None = None,
) -> float | None:
    """Fraction of (sample, discrete feature) entries recovered exactly.

    :param a, b: ``(B, F)`` true and reconstructed samples in *unit space* (raw values).
    :param discrete: indices of the discrete features.
    :param supports: for each entry of ``discrete``, the values that feature takes
        (e.g. the unique values in the training data); both the truth and the
        reconstruction are snapped to the nearest of them before comparison. Without
        supports, values are rounded to the nearest integer.
    :returns: the accuracy, or None when there is no discrete feature.
    """
    _check_pair(a, b)
    if a.ndim != 2:
        raise ValueError(f"expected tabular samples (B, F), got shape {tuple(a.shape)}")
    if not len(discrete) or a.shape[0] == 0:
        return None
    if supports is not None and len(supports) != len(discrete):
        raise ValueError("supports must give one tensor (or None) per discrete feature")
    a = a.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu()
    hits = []
    for k, j in enumerate(discrete):
        sup = supports[k] if supports is not None else None
        finite = torch.isfinite(b[:, j])  # a non-finite value is a miss
        hits.append((_snap(a[:, j], sup) == _snap(torch.where(finite, b[:, j], 0.0), sup)) & finite)
    return float(torch.stack(hits).to(torch.float64).mean())
