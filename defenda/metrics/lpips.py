"""LPIPS (AlexNet, v0.1): finding and loading the backbone weights, and the perceptual distance.

The AlexNet trunk is never downloaded: its checkpoint is looked up (see
:func:`lpips_backbone_status`); without it LPIPS is unavailable, warned about once
per process (:class:`LPIPSUnavailableWarning`), and reported as None. Loaded models
are cached per process, keyed by checkpoint and device.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from defenda.metrics.spaces import _check_pair, unit_images

if TYPE_CHECKING:
    from torch import nn

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
