"""Generative image priors for GIAS/GIML (Jeon et al., NeurIPS 2021): generators, GAN/VAE training, checkpoints.

Private helper module of the ``gias`` and ``giml`` attacks.

* :class:`DCGANGenerator` — a DCGAN generator sized for the task: ``z`` (``latent_dim``)
  → transposed conv to an ``s₀×s₀`` map → ``k`` up-blocks (ConvT 4/2/1 + BN + ReLU,
  halving the width) → 1×1 transposed conv to the image channels → tanh. ``s₀`` is
  the image side divided by the largest power of two that leaves it ≥ 4
  (8×8: s₀ = 4, k = 1; 28×28: 7, 2; 32×32: 4, 3), so 8×8 digits up to 32×32 RGB
  images are covered; every conv is bias-free as in the paper's DCGAN.
* :func:`train_gan_prior` — the attacker's prior: ordinary GAN training (non-saturating
  loss, spectral-norm discriminator, lazy R1 penalty, BatchNorm statistics refreshed from
  random latents at the end) on the attacker-public split only,
  with DiffAugment-style translation of real *and* fake images (Zhao et al. 2020) so
  that a split of ~180 digits does not make the discriminator memorise.
* :func:`train_vae_prior` — the prior for 32×32 RGB photographs (GIAS ``prior = "vae"``, the
  ``auto`` choice above 16 px a side): the same :class:`DCGANGenerator` trained as the decoder of
  a VAE (Gaussian likelihood, KL to N(0, I)) on random crops (reflect padding) and horizontal
  flips of the public split, BatchNorm statistics then recalibrated from ``z ~ N(0, I)``. A GAN on
  the ~160 public crops of ``photos`` does not converge in CPU minutes; 1000 VAE steps take
  ~1.5 min on one thread and its decoder fits held-out crops to ~24 dB through the latent alone.
* :func:`save_state` / :func:`load_state` — checkpoints hold a ``state_dict`` only and
  are read with ``torch.load(..., weights_only=True)``: a file that is not a plain
  tensor dictionary (e.g. a pickle carrying code) is refused with
  :class:`CheckpointError`, never executed. Writes are atomic (temp file + rename),
  so parallel workers that train the same prior never see half a file, and
  :func:`training_lock` makes the second worker wait for the first one's prior instead
  of training it again.
* :func:`cache_key` — a stable hash of the settings *and the data* the generator was
  trained from (the public split's bytes, or the initial model and history for GIML), so one
  study trains each prior once.

*Same prior, same bits.* A cached prior is a function of its cache key alone, so it does
not matter which worker trained it, when, or whether a killed run trained it halfway: the
training seeds come from the settings in the key (never from the process's RNG), it runs on
:data:`PRIOR_THREADS` torch threads (:func:`prior_threads`, in the key), the device type is
in the key, and a checkpoint file's bytes depend on its contents only (:func:`save_state`).
Two workers that train the same prior at once (no ``fcntl``) write the same bytes.

Images: a generator's output ``G(z) ∈ [−1, 1]`` maps to model space as
``x = ((G(z) + 1)/2 − μ)/σ`` (:func:`to_model_space`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

#: process-wide memo of trained generators, keyed like the disk cache (used when there is no cache_dir)
_MEMO: dict[str, dict[str, torch.Tensor]] = {}
#: torch threads of every prior training, whoever calls it: the thread count changes float summation
#: order, and GAN / meta-training amplify a last-bit difference into a different generator
PRIOR_THREADS = 1


@contextlib.contextmanager
def prior_threads() -> Iterator[None]:
    """Train on :data:`PRIOR_THREADS` torch threads; the caller's count is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(PRIOR_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded safely (not a plain tensor state_dict)."""


# --------------------------------------------------------------------------- architecture


def _layout(side: int) -> tuple[int, int]:
    """(start side s₀, number of ×2 up-blocks k) for an image side."""
    k = 0
    while side % (2 ** (k + 1)) == 0 and side // 2 ** (k + 1) >= 4:
        k += 1
    return side // 2**k, k


class DCGANGenerator(nn.Module):
    """DCGAN generator for ``(C, S, S)`` images: ``(N, latent_dim)`` → ``(N, C, S, S)`` in [−1, 1]."""

    def __init__(self, image_shape: tuple[int, ...], latent_dim: int = 32, width: int = 32) -> None:
        super().__init__()
        if len(image_shape) != 3 or image_shape[1] != image_shape[2]:
            raise ValueError(f"DCGANGenerator needs square images (C, S, S), got {image_shape}")
        channels, side = image_shape[0], image_shape[1]
        start, ups = _layout(side)
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        ch = width * 2**ups
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, ch, start, 1, 0, bias=False), nn.BatchNorm2d(ch), nn.ReLU(),
        ]
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ch // 2), nn.ReLU()]
            ch //= 2
        layers += [nn.ConvTranspose2d(ch, channels, 1, 1, 0, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.reshape(z.shape[0], -1, 1, 1))


class _Discriminator(nn.Module):
    """Spectral-norm conv discriminator mirroring :class:`DCGANGenerator` (used only to train the prior)."""

    def __init__(self, image_shape: tuple[int, ...], width: int = 32) -> None:
        super().__init__()
        channels, side = image_shape[0], image_shape[1]
        start, downs = _layout(side)
        sn = nn.utils.spectral_norm
        layers: list[nn.Module] = [sn(nn.Conv2d(channels, width, 3, 1, 1)), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(downs):
            layers += [sn(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [nn.Flatten(), sn(nn.Linear(ch * start * start, 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).flatten()


def build_generator(image_shape: tuple[int, ...], latent_dim: int, width: int) -> DCGANGenerator:
    return DCGANGenerator(tuple(image_shape), latent_dim, width)


def to_model_space(g: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Generator output in [−1, 1] → model space: ``((g + 1)/2 − μ)/σ``."""
    return ((g + 1) / 2 - mean.to(g)) / std.to(g)


# --------------------------------------------------------------------------- GAN training


def _translate(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random integer translation by up to ``shift`` pixels per image, filling with the background (−1)."""
    if shift <= 0:
        return x
    return _random_crop(F.pad(x, (shift, shift, shift, shift), value=-1.0), shift, gen)


def _random_crop(padded: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Per image, the ``H × W`` window at a random offset in ``[0, 2·shift]²`` of images padded by ``shift``."""
    n, _, hp, wp = padded.shape
    h, w = hp - 2 * shift, wp - 2 * shift
    dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).to(padded.device)  # (n, h)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).to(padded.device)  # (n, w)
    idx_n = torch.arange(n, device=padded.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
    return out.permute(0, 3, 1, 2)


def _seeded_nets(seed: int, device: torch.device, *builders):
    """Build each network under ``seed`` without touching the global RNG (same weights on every machine)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [build().to(device) for build in builders]


def train_gan_prior(
    images: torch.Tensor,
    *,
    latent_dim: int,
    width: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    shift: int = 1,
    r1: float = 1.0,
    r1_every: int = 4,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DCGANGenerator:
    """Train a DCGAN generator on ``images`` (unit space, ``(N, C, S, S)`` in [0, 1]); returned in eval mode.

    Non-saturating GAN loss, Adam(lr, β = (0.5, 0.99)) for both nets, an R1 gradient
    penalty on real images every ``r1_every`` steps (lazy R1), and the same random translation (up to ``shift`` pixels)
    applied to real and generated images before the discriminator (DiffAugment).
    The global RNG is untouched (a private generator seeds everything); it runs on
    :data:`PRIOR_THREADS` threads, so the result depends on the arguments only.
    """
    with prior_threads():
        return _train_gan(images, latent_dim=latent_dim, width=width, steps=steps, batch_size=batch_size, lr=lr,
                          shift=shift, r1=r1, r1_every=r1_every, seed=seed, device=torch.device(device))


def _train_gan(images: torch.Tensor, *, latent_dim: int, width: int, steps: int, batch_size: int, lr: float,
               shift: int, r1: float, r1_every: int, seed: int, device: torch.device) -> DCGANGenerator:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(images.shape[1:])
    g_net, d_net = _seeded_nets(seed, device, lambda: build_generator(shape, latent_dim, width),
                                lambda: _Discriminator(shape, width))
    real_all = (images.to(device) * 2 - 1).clamp(-1, 1)
    opt_g = torch.optim.Adam(g_net.parameters(), lr=lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(d_net.parameters(), lr=lr, betas=(0.5, 0.99))
    g_net.train()
    d_net.train()
    n = len(real_all)
    for step in range(steps):
        lazy = r1 > 0 and step % r1_every == 0
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        real = _translate(real_all[idx.to(device)], shift, gen).requires_grad_(lazy)
        z = torch.randn(batch_size, latent_dim, generator=gen).to(device)
        fake = g_net(z)
        # discriminator
        d_real = d_net(real)
        d_fake = d_net(_translate(fake.detach(), shift, gen))
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        if lazy:  # lazy R1 (StyleGAN2): every r1_every steps, scaled up to keep its weight
            (gr,) = torch.autograd.grad(d_real.sum(), real, create_graph=True)
            loss_d = loss_d + 0.5 * r1 * r1_every * gr.pow(2).flatten(1).sum(1).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator
        loss_g = F.softplus(-d_net(_translate(fake, shift, gen))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    calibrate_batchnorm(g_net, gen)
    return g_net.eval()


class _Encoder(nn.Module):
    """Conv encoder mirroring :class:`DCGANGenerator` (used only to train the VAE prior): image → (μ, log σ²)."""

    def __init__(self, image_shape: tuple[int, ...], latent_dim: int, width: int = 32) -> None:
        super().__init__()
        channels, side = image_shape[0], image_shape[1]
        start, downs = _layout(side)
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, 1, 1), nn.LeakyReLU(0.2)]
        ch = width
        for _ in range(downs):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.BatchNorm2d(ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        layers += [nn.Flatten(), nn.Linear(ch * start * start, 2 * latent_dim)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)
        return mu, logvar.clamp(-10, 4)


def _augment(x: torch.Tensor, shift: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flips and random crops of the reflect-padded images (photographs: no background)."""
    n, _, h, w = x.shape
    if flip:
        mask = (torch.rand(n, generator=gen) < 0.5).to(x.device).view(n, 1, 1, 1)
        x = torch.where(mask, x.flip(3), x)
    if shift <= 0:
        return x
    return _random_crop(F.pad(x, (shift, shift, shift, shift), mode="reflect"), shift, gen)


def train_vae_prior(
    images: torch.Tensor,
    *,
    latent_dim: int,
    width: int,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    shift: int = 4,
    beta: float = 1.0,
    noise: float = 0.1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> DCGANGenerator:
    """Train a :class:`DCGANGenerator` as the decoder of a VAE on ``images`` (unit space); eval mode.

    The prior for photographs, where a GAN on ~100-160 crops does not converge in CPU minutes:
    Gaussian likelihood with pixel noise ``noise`` (in the generator's [−1, 1] range) plus
    ``beta``·KL(q(z|x) ‖ N(0, I)), Adam(lr, β = (0.5, 0.99)) with the step size ×0.1 over the last
    quarter, on random flips and random crops (``shift`` pixels, reflect padding) of the public
    images. The decoder's BatchNorm statistics are then recomputed from ``z ~ N(0, I)`` (what the
    latent search starts from). The global RNG is untouched; :data:`PRIOR_THREADS` threads.
    """
    with prior_threads():
        return _train_vae(images, latent_dim=latent_dim, width=width, steps=steps, batch_size=batch_size, lr=lr,
                          shift=shift, beta=beta, noise=noise, seed=seed, device=torch.device(device))


def _train_vae(images: torch.Tensor, *, latent_dim: int, width: int, steps: int, batch_size: int, lr: float,
               shift: int, beta: float, noise: float, seed: int, device: torch.device) -> DCGANGenerator:
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(images.shape[1:])
    decoder, encoder = _seeded_nets(seed, device, lambda: build_generator(shape, latent_dim, width),
                                    lambda: _Encoder(shape, latent_dim, width))
    real_all = (images.to(device) * 2 - 1).clamp(-1, 1)
    params = [*decoder.parameters(), *encoder.parameters()]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.99))
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[max(1, (3 * steps) // 4)], gamma=0.1)
    decoder.train()
    encoder.train()
    n = len(real_all)
    pixels = real_all[0].numel()
    for _ in range(steps):
        idx = torch.randint(0, n, (batch_size,), generator=gen)
        real = _augment(real_all[idx.to(device)], shift, True, gen)
        mu, logvar = encoder(real)
        eps = torch.randn(mu.shape, generator=gen).to(device)
        recon = decoder(mu + eps * (0.5 * logvar).exp())
        nll = (recon - real).pow(2).flatten(1).sum(1) / (2 * noise**2)
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        loss = (nll + beta * kl).mean() / pixels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    calibrate_batchnorm(decoder, gen)
    return decoder.eval()


def calibrate_batchnorm(generator: DCGANGenerator, gen: torch.Generator, samples: int = 2048) -> DCGANGenerator:
    """Set the BatchNorm running statistics to those of ``samples`` random latents (data-free); eval mode after.

    Eval-mode BatchNorm uses these statistics; with the defaults (mean 0, variance 1) a
    freshly initialised generator maps every latent to nearly the same image.
    """
    device = next(generator.parameters()).device
    generator.train()
    with torch.no_grad():
        for m in generator.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        for _ in range(max(1, samples // 256)):
            generator(torch.randn(256, generator.latent_dim, generator=gen).to(device))
        for m in generator.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
    return generator.eval()


# --------------------------------------------------------------------------- checkpoints


def cache_key(kind: str, settings: Mapping[str, Any], *tensors: torch.Tensor) -> str:
    """A stable hex key for ``settings`` and the exact contents of ``tensors``."""
    h = hashlib.sha256()
    h.update(kind.encode())
    h.update(json.dumps(dict(settings), sort_keys=True, default=str).encode())
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.numpy().tobytes())
    return f"{kind}-{h.hexdigest()[:20]}"


def save_state(state: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write a (nested) dict of tensors and plain values atomically with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Serialised to memory first: torch.save names the archive inside the file after the file it
    # writes, so saving to the random temp name would make equal checkpoints differ in their bytes.
    buffer = io.BytesIO()
    torch.save(_to_cpu(state), buffer)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())  # a power loss after the rename must not leave an empty file
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache is meant to be shared like any output file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_state` with ``weights_only=True``.

    :raises CheckpointError: the file is not a dict of tensors/plain values (for
        instance a pickle that would run code), or it cannot be read.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for forbidden globals, EOFError/RuntimeError for damage
        raise CheckpointError(
            f"refusing to load checkpoint {path}: not a plain tensor state_dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); delete it to retrain"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"refusing to load checkpoint {path}: expected a dict, got {type(state).__name__}")
    return state


def load_generator_state(generator: nn.Module, state: Mapping[str, Any], path: Any = "<memory>") -> None:
    """Load a generator state_dict strictly; a mismatch is a :class:`CheckpointError`."""
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} is not a tensor state_dict")
    try:
        generator.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit the generator: {str(exc).splitlines()[0]}") from None


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, Mapping):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def cache_path(cache_dir: str | os.PathLike[str] | None, key: str) -> Path | None:
    """``cache_dir/generators/<key>.pt`` (None without a cache directory)."""
    return None if cache_dir is None else Path(cache_dir) / "generators" / f"{key}.pt"


def cached_generator_state(key: str, cache_dir: str | None) -> dict[str, torch.Tensor] | None:
    """A cached generator state_dict: the process memo first, then the disk cache."""
    if key in _MEMO:
        return _MEMO[key]
    path = cache_path(cache_dir, key)
    if path is not None and path.is_file():
        state = load_state(path)
        _MEMO[key] = state
        return state
    return None


def store_generator_state(key: str, cache_dir: str | None, state: Mapping[str, torch.Tensor]) -> None:
    """Remember a generator state_dict in the process memo and, with a cache directory, on disk."""
    cpu_state = _to_cpu(dict(state))
    _MEMO[key] = cpu_state
    path = cache_path(cache_dir, key)
    if path is not None:
        save_state(cpu_state, path)


@contextlib.contextmanager
def training_lock(cache_dir: str | os.PathLike[str] | None, key: str) -> Iterator[None]:
    """Hold ``cache_dir/generators/<key>.lock`` while training the prior ``key``.

    Parallel workers of one study reach the same uncached prior at the same time; the
    lock makes all but one wait and then load the cached result (callers check the cache
    again inside the lock). Without a cache directory, or where ``fcntl`` is missing
    (Windows), it does nothing: the worst case is training twice, which is still correct.
    """
    path = cache_path(cache_dir, key)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None  # type: ignore[assignment]
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, also if the process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
