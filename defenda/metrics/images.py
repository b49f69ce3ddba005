"""Image scores in unit space: MSE, PSNR and SSIM, each per image then averaged over the batch.

:func:`mse` and :func:`mse_per_image` score the tensors as given, so the tabular MSE
uses them too (on standardised features).
"""

from __future__ import annotations

import torch

from defenda.metrics.spaces import _check_pair, unit_images

#: PSNR reported for a perfect reconstruction. Exact recoveries computed in
#: float64 from float32 inputs land at ~100–300 dB; values are capped here
#: (reached only when the MSE is 0 or below 1e-30), so the column stays finite.
PSNR_CAP_DB = 300.0


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
