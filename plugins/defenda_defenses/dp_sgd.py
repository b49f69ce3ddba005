"""``dp-sgd``: differentially private SGD through Opacus.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy") as
implemented by Opacus (Yousefpour et al. 2021, "Opacus: User-Friendly
Differential Privacy Library in PyTorch"): per-sample gradients are clipped to
L2 norm ``max_grad_norm`` (C), summed, Gaussian noise N(0, (σ·C)²) is added to
every coordinate and the sum is divided by the (expected) batch size. Nothing
of that is re-implemented here: the client's model is wrapped in Opacus'
``GradSampleModule`` and stepped by Opacus' ``DPOptimizer`` (flat clipping,
``loss_reduction="mean"``, ``expected_batch_size`` = the expected size of a
Poisson batch, or ``len(x)`` for a fixed-size one), exactly what
``PrivacyEngine.make_private`` builds with ``poisson_sampling=True`` or
``False`` respectively.

What the server sees
    ``kind="gradient"`` (FedSGD): the clipped, noised, averaged gradient Opacus
    produced for the batch (``p.grad`` after ``DPOptimizer.pre_step``). In a
    federation the batch is Poisson-sampled (:attr:`DPSGD.poisson_sampling`,
    see below) and ``settings.local_batch_size`` is its expected size b: the
    clipped sum is divided by b, not by ``len(x)``, and an empty batch
    releases noise only, N(0, (σ·C/b)²) per coordinate, drawn as Opacus'
    ``DPOptimizer`` draws it for a zero sum. Without ``local_batch_size``
    (the single-client protocol) the divisor is ``len(x)`` and an empty
    batch is an error.
    ``kind="delta"`` (FedAvg): ``θ_after − θ_before`` after ``local_steps``
    DP-SGD steps (each re-clips and re-noises) on the client's batch; with
    ``settings.local_epochs > 0`` (FedAvg over the client's data) E epochs of
    DP-SGD steps on Poisson-sampled batches of the client's data, drawn exactly
    as Opacus' ``DPDataLoader`` draws them (``UniformWithReplacementSampler`` at
    rate q = 1/⌈n/b⌉, ``int(1/q)`` batches per epoch, a batch may be empty; from
    the round's order seed) and divided by Opacus' expected batch size ``int(n·q)``.

The caller's model is never touched: the defense works on a private deep copy
(put in training mode — Opacus computes per-sample gradients only there),
validated with Opacus' ``ModuleValidator`` and, when invalid, fixed by it
(BatchNorm → GroupNorm; the replacement is named in ``meta['model_fixed']`` and
the parameters keep their names and shapes, so the update still matches the
caller's model). The wrapped copy is cached per model object (weakly) and its
parameters/buffers are re-copied from the model on every call; it is rebuilt
whenever the model's architecture (``repr``), parameter names, shapes, dtypes,
devices or ``requires_grad`` flags differ from the cached one.

Randomness
    The noise is drawn by Opacus from the trial's ``generator``; same generator
    state → same update. When the model is on another device than the
    generator (a CPU generator and a CUDA model), a generator on the model's
    device is seeded from one draw of ``generator``.

Privacy accounting (``epsilon``)
    ε after the study's utility training, from Opacus' accountant
    (``accountant = "rdp"`` — Rényi DP, Mironov 2017 / Mironov et al. 2019 —
    or ``"prv"`` — privacy random variables, Gopi et al. 2021), for
    ``steps`` = rounds of the Poisson-subsampled Gaussian mechanism with
    sampling rate ``sample_rate`` (client batch size / train-split size) and
    the study's δ. Opacus' accountants assume Poisson sampling. In a
    federation that is the sampling that runs (FedSGD: each of the client's
    n_k samples at rate q = min(1, b/n_k); FedAvg: Opacus' own sampler, below),
    so the ledger's ε is that of the released mechanism. The old single-client
    protocol (the utility loop of :func:`defenda.federation.training.train`,
    run by ``defenda.harness.utility``, and the single-client attack trial)
    still draws a fixed-size batch without replacement each round and
    accounts it as Poisson at rate b/n — the usual approximation (Opacus
    makes the same one with ``poisson_sampling=False``).
    With FedAvg (``kind="delta"``) a round is ``k = local_steps`` DP-SGD steps on
    the *same* batch: their composition is exactly one Gaussian mechanism with
    noise multiplier ``σ/√k`` (Gaussian DP, Dong, Roth & Su 2022), subsampled once
    per round, so ε is accounted with ``σ/√k`` per round — not ``k`` independently
    subsampled steps, which would overstate the privacy. ``k`` is taken from the
    ``local_steps`` argument of ``epsilon`` or else from the last
    ``client_update`` call. σ = 0 gives ε = ∞. For small σ Opacus' PRV accountant
    needs an enormous grid (tens of GiB at σ = 0.01, q ≈ 0.025, 150 steps) and
    overflows; beyond :data:`PRV_MAX_GRID` points the RDP ε (also a valid upper
    bound, looser) is reported with a warning, and ``last_accounting`` says which
    accountant produced the last ε.

In a federation
    Each participation adds :meth:`DPSGD.sample_ledger_entry` to the client's
    ledger (σ, q, steps), composed with the ``accountant`` parameter, with q
    the very rate at which the client's batch was drawn; the
    noise is ``"before"`` what the server observes (it sees noisy updates),
    and the local sampling randomness is the client's own, so the
    amplification holds against the server too.

Target-ε mode (``target_epsilon > 0``)
    σ is calibrated through Opacus (``opacus.accountants.utils.get_noise_multiplier``)
    so that the utility training reaches ``target_epsilon`` at the study's δ;
    ``noise_multiplier`` is then ignored and the calibrated σ is written in every
    update's ``meta``. The calibration needs the study's accounting
    (rounds, client batch size / train-split size, δ, local steps), which a
    defense does not know when it is constructed and ``client_update`` does
    not receive. The harness therefore calls :meth:`DPSGD.calibrate` once,
    before the first ``client_update``, in both the utility run and the
    attack trial — so the attacker faces exactly the σ whose ε is reported.
    ``client_update`` in target-ε mode without a prior ``calibrate`` raises a
    clear error rather than guess; ``epsilon`` calibrates from its own
    arguments when nothing was calibrated yet (it then reports ≈ the target).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from defenda import Defense, RoundSettings, SharedUpdate, param

if TYPE_CHECKING:
    from torch import nn

ACCOUNTANTS = ("rdp", "prv")
#: largest PRV discretisation grid (points) computed; beyond it ε comes from RDP (about 2 s at this size)
PRV_MAX_GRID = 2_000_000


@dataclass
class _Wrapped:
    """A private, Opacus-wrapped copy of one caller model."""

    signature: tuple[Any, ...]
    local: Any  # the (fixed) deep copy, nn.Module
    gsm: Any  # opacus GradSampleModule around ``local``
    params: list[torch.nn.Parameter]
    fixed: str | None


def _signature(model: nn.Module) -> tuple[Any, ...]:
    return (
        repr(model),
        tuple((n, tuple(p.shape), p.dtype, p.device, p.requires_grad) for n, p in model.named_parameters()),
        tuple((n, tuple(b.shape), b.dtype, b.device) for n, b in model.named_buffers()),
    )


def _noise_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` when it lives on ``device``; else a generator on ``device`` seeded from it."""
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def prv_grid_size(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Points of the discretisation grid Opacus' PRV accountant would build (as in ``PRVAccountant._get_domain``
    with its default ``eps_error=0.01``, ``delta_error=δ/1000``). It explodes for small σ."""
    import numpy as np
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV, compute_safe_domain_size

    eps_error, delta_error = 0.01, delta / 1000
    half_width = compute_safe_domain_size([PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)], [steps],
                                          eps_error=eps_error, delta_error=delta_error)
    mesh = eps_error / np.sqrt(steps * np.log(12 / delta_error) / 2)
    return float(2 * half_width / mesh)


def epsilon_from_accountant(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                            accountant: str = "rdp") -> tuple[float, str]:
    """ε of ``steps`` Poisson-subsampled Gaussian steps from Opacus' accountant, and the accountant used.

    PRV falls back to RDP (also a valid upper bound on ε, only looser) when its grid would exceed
    :data:`PRV_MAX_GRID` points: for small σ Opacus' PRV needs tens of GiB and minutes, and overflows.
    """
    from opacus.accountants import create_accountant

    if steps <= 0:
        return 0.0, accountant
    if noise_multiplier <= 0:
        return math.inf, accountant
    with warnings.catch_warnings():
        # RDP's note that the optimal order sits at the edge of its grid (very small or large σ) is not
        # actionable here: ε is then either astronomically large or tiny anyway.
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        if accountant == "prv":
            size = prv_grid_size(noise_multiplier, sample_rate, steps, delta)
            if size > PRV_MAX_GRID:
                warnings.warn(f"dp-sgd: Opacus' PRV accountant would need a grid of {size:.3g} points for "
                              f"σ={noise_multiplier:g}, q={sample_rate:g}, {steps} steps; reporting the RDP "
                              "accountant's ε instead (also an upper bound, looser)", RuntimeWarning, stacklevel=3)
                accountant = "rdp"
        acc = create_accountant(mechanism=accountant)
        for _ in range(steps):
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
        return float(acc.get_epsilon(delta=delta)), accountant


class DPSGD(Defense):
    """DP-SGD through Opacus: per-sample gradient clipping and Gaussian noise in the client's SGD.

    Paper: M. Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, as implemented by
    Opacus (A. Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch",
    2021). <https://arxiv.org/abs/1607.00133>

    Acts on: how the client computes its update (client-side): per-sample gradients are
    clipped to ``max_grad_norm``, summed, noised with N(0, (σ·C)²) and averaged by Opacus'
    ``DPOptimizer`` on a private copy of the model; the server sees the noised FedSGD gradient
    or the FedAvg delta after ``local_steps`` DP-SGD steps (with ``local_epochs``: one step per
    mini-batch of the client's epochs). It is told ``noise_multiplier``,
    ``max_grad_norm``, ``noise_std``, ``dp_steps``, ``accountant``, ``secure_mode`` (and
    ``target_epsilon``, ``calibration``, ``model_fixed`` when they apply) in ``meta``;
    :meth:`epsilon` reports ε of the utility training, :meth:`sample_ledger_entry` what one
    participation in a federation adds to the client's sample-level ledger.

    Arguments:
        noise_multiplier (float, 1.0): σ, the noise std in units of ``max_grad_norm``; the strength,
            larger is stronger (ignored when ``target_epsilon > 0``).
        max_grad_norm (float, 1.0): C, the per-sample gradient L2 clipping bound.
        accountant (str, "rdp"): Opacus accountant for ε: ``rdp`` (Rényi DP) or ``prv``.
        target_epsilon (float, 0.0): calibrate σ to reach this ε after the utility training (0 = off).
        secure_mode (bool, False): Opacus' secure noise sampling.

    Example::

        from defenda import RoundSettings
        dp = DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
        update = dp.client_update(model, x, y, RoundSettings("delta", local_steps=2), generator=gen)
        eps = dp.epsilon(steps=100, sample_rate=0.02, delta=1e-5)
    """

    name = "dp-sgd"
    default_sweep = (0.01, 0.1, 0.5, 1.0, 2.0)
    #: the ledger accounts a Poisson-subsampled Gaussian, so a federation draws Poisson FedSGD batches
    poisson_sampling = True

    @dataclass(frozen=True)
    class Params:
        noise_multiplier: float = param(
            1.0, "σ: std of the Gaussian noise added to the sum of clipped per-sample gradients, "
                 "in units of max_grad_norm (ignored when target_epsilon > 0)", strength="up")
        max_grad_norm: float = param(1.0, "C: per-sample gradient L2 clipping bound")
        accountant: str = param("rdp", "Opacus accountant for ε: 'rdp' (Rényi DP) or 'prv' (privacy random "
                                       "variables)", choices=ACCOUNTANTS)
        target_epsilon: float = param(0.0, "calibrate σ through Opacus to reach this ε after the study's "
                                           "utility training (0 = off, use noise_multiplier)")
        secure_mode: bool = param(False, "Opacus' secure noise sampling (robust to floating-point attacks)")

        def __post_init__(self) -> None:
            if not math.isfinite(self.noise_multiplier) or self.noise_multiplier < 0:
                raise ValueError(f"noise_multiplier must be a finite number >= 0, got {self.noise_multiplier}")
            if not math.isfinite(self.max_grad_norm) or self.max_grad_norm <= 0:
                raise ValueError(f"max_grad_norm must be a finite number > 0, got {self.max_grad_norm}")
            if self.accountant not in ACCOUNTANTS:
                raise ValueError(f"accountant must be one of {list(ACCOUNTANTS)}, got {self.accountant!r}")
            if not math.isfinite(self.target_epsilon) or self.target_epsilon < 0:
                raise ValueError(f"target_epsilon must be a finite number >= 0 (0 = off), got {self.target_epsilon}")

    def __init__(self, params: Any = None, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self._reset_state()

    def _reset_state(self) -> None:
        self._wrapped: weakref.WeakKeyDictionary[Any, _Wrapped] = weakref.WeakKeyDictionary()
        self._calibrated: float | None = None
        self._calibration: dict[str, Any] | None = None
        self._steps_per_round: int | None = None
        #: how the last ε was computed (accountant actually used, σ, k, steps, q, δ)
        self.last_accounting: dict[str, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_wrapped", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._wrapped = weakref.WeakKeyDictionary()

    # ---------------------------------------------------------------- noise level

    @property
    def noise_multiplier(self) -> float:
        """The σ in use: the parameter, or the calibrated one in target-ε mode."""
        if self.params.target_epsilon <= 0:
            return self.params.noise_multiplier
        if self._calibrated is None:
            raise RuntimeError(
                "dp-sgd: target_epsilon is set but σ was not calibrated; call "
                "defense.calibrate(steps=<rounds>, sample_rate=<client batch size / train size>, delta=<δ>, "
                "local_steps=<DP steps per round>) before client_update (the harness does this)")
        return self._calibrated

    def calibrate(self, *, steps: int, sample_rate: float, delta: float, local_steps: int = 1) -> float:
        """Target-ε mode: find σ through Opacus for this accounting; returns σ (no-op otherwise).

        :param steps: rounds of utility training (one subsampled mechanism per round).
        :param sample_rate: client batch size / train-split size.
        :param local_steps: DP-SGD steps per round on the same batch (FedAvg; 1 for FedSGD).
        """
        if self.params.target_epsilon <= 0:
            return self.params.noise_multiplier
        from opacus.accountants.utils import get_noise_multiplier

        _check_accounting(steps, sample_rate, delta)
        key = {"steps": int(steps), "sample_rate": float(sample_rate), "delta": float(delta),
               "local_steps": int(local_steps)}
        if self._calibration != key:
            with warnings.catch_warnings():
                # the bisection visits large σ, where RDP's optimal order is the largest one tried
                warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
                try:
                    sigma_round = get_noise_multiplier(target_epsilon=self.params.target_epsilon,
                                                       target_delta=delta, sample_rate=sample_rate,
                                                       steps=int(steps), accountant=self.params.accountant)
                except MemoryError:
                    raise ValueError(f"dp-sgd: calibrating σ for target_epsilon={self.params.target_epsilon} "
                                     "with the PRV accountant needs too much memory (a weak target means a "
                                     "small σ); use accountant = 'rdp'") from None
            self._calibrated = float(sigma_round) * math.sqrt(max(1, int(local_steps)))
            self._calibration = key
        assert self._calibrated is not None
        return self._calibrated

    def epsilon(self, *, steps: int, sample_rate: float, delta: float, local_steps: int | None = None) -> float:
        """ε after ``steps`` rounds at ``sample_rate`` and ``delta`` (Opacus' RDP or PRV accountant)."""
        k = int(local_steps or self._steps_per_round or 1)
        if self.params.target_epsilon > 0 and self._calibrated is None:
            self.calibrate(steps=steps, sample_rate=sample_rate, delta=delta, local_steps=k)
        if steps <= 0:
            return 0.0
        _check_accounting(steps, sample_rate, delta)
        eps, used = epsilon_from_accountant(self.noise_multiplier / math.sqrt(k), sample_rate, int(steps), delta,
                                            self.params.accountant)
        self.last_accounting = {"accountant": used, "noise_multiplier": self.noise_multiplier, "local_steps": k,
                                "steps": int(steps), "sample_rate": float(sample_rate), "delta": float(delta),
                                "epsilon": eps}
        return eps

    # ---------------------------------------------------------------- in a federation

    def sample_ledger_entry(self, settings: RoundSettings, batch_size: int) -> tuple[float, float, int]:
        """Sample-level DP: the ``(σ_eff, q, steps)`` one participation adds to the client's ledger.

        * FedSGD: ``(σ, b/n_k, 1)`` — one step on a batch of b = ``settings.local_batch_size``
          (the expected size of the federation's Poisson batch; else ``batch_size``) from the
          client's ``settings.client_samples`` (q = 1 when that is 0: the batch is all of the data).
        * FedAvg with ``local_steps`` k full-batch steps on the same batch: ``(σ/√k, b/n_k, 1)``,
          one Gaussian mechanism (see :meth:`epsilon`).
        * FedAvg with ``local_epochs`` E: ``(σ, q, E·int(1/q))`` with q = 1/⌈n_k/b⌉, b =
          ``local_batch_size``: the client's batches are Poisson-sampled from its data exactly as
          Opacus' ``DPDataLoader`` samples them (``UniformWithReplacementSampler``), so the
          accounting is Opacus' own, with no approximation.
        """
        sigma = self.noise_multiplier
        if settings.kind == "delta" and settings.local_epochs > 0:
            n = settings.client_samples or batch_size
            q = poisson_rate(n, settings.local_batch_size)
            return sigma, q, settings.local_epochs * steps_per_epoch(q)
        if settings.kind == "gradient" and settings.local_batch_size > 0:
            batch_size = settings.local_batch_size  # the Poisson rate the batch was drawn at, not its realised size
        q = min(1.0, batch_size / settings.client_samples) if settings.client_samples > 0 else 1.0
        if settings.kind == "delta":
            return sigma / math.sqrt(settings.local_steps), q, 1
        return sigma, q, 1

    def ledger_accountant(self) -> str:
        """The Opacus accountant of the ledgers: the ``accountant`` parameter."""
        return self.params.accountant

    def noise_position(self) -> str | None:
        """``"before"``: the noise is in the update the server observes (None without noise)."""
        if self.params.target_epsilon <= 0 and self.params.noise_multiplier == 0:
            return None
        return "before"

    # ---------------------------------------------------------------- the update

    def _wrap(self, model: nn.Module) -> _Wrapped:
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        sig = _signature(model)
        entry = self._wrapped.get(model)
        if entry is not None and entry.signature == sig:
            return entry
        local = copy.deepcopy(model)
        local.train()  # Opacus computes per-sample gradients in training mode only
        fixed = None
        if not ModuleValidator.is_valid(local):
            before = {n: type(m).__name__ for n, m in local.named_modules()}
            local = ModuleValidator.fix(local)
            after = {n: type(m).__name__ for n, m in local.named_modules()}
            changes = sorted({f"{before[n]}→{after[n]}" for n in before if n in after and before[n] != after[n]})
            fixed = ", ".join(changes) or "fixed by Opacus' ModuleValidator"
            errors = ModuleValidator.validate(local)
            if errors:
                raise ValueError("dp-sgd: Opacus cannot train this model even after ModuleValidator.fix: "
                                 + "; ".join(str(e).splitlines()[0] for e in errors))
        names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
        if [(n, tuple(p.shape)) for n, p in local.named_parameters()] != names:
            raise ValueError(f"dp-sgd: Opacus' model fix ({fixed}) changed the model's parameters; "
                             "use a model Opacus supports as is (e.g. GroupNorm instead of BatchNorm)")
        gsm = GradSampleModule(local)  # hooks on the private copy only
        entry = _Wrapped(sig, local, gsm, list(local.parameters()), fixed)
        self._wrapped[model] = entry
        return entry

    def client_update(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: RoundSettings,
                      generator: torch.Generator | None = None) -> SharedUpdate:
        from opacus.optimizers import DPOptimizer

        kind, lr = settings.kind, settings.lr
        expected = settings.local_batch_size if kind == "gradient" else 0
        if len(x) == 0 and expected <= 0:
            raise ValueError("dp-sgd: empty batch (only a FedSGD batch with its expected size in "
                             "settings.local_batch_size, i.e. a Poisson batch, may be empty)")
        epochs = kind == "delta" and settings.local_epochs > 0
        if epochs:  # FedAvg over the client's data: Poisson-sampled DP-SGD batches, as Opacus' DPDataLoader
            batches, divisor = _poisson_batches(x, y, settings)
        else:  # FedSGD (one step) or ``local_steps`` full-batch steps on the same batch
            batches = [(x, y)] * (settings.local_steps if kind == "delta" else 1)
            # a Poisson batch is divided by its expected size (Opacus' expected_batch_size): dividing by
            # the realised size would make the sensitivity, and so the accounted mechanism, random
            divisor = expected if expected > 0 else len(x)
            self._steps_per_round = len(batches)
        steps = len(batches)
        sigma = self.noise_multiplier
        clip = self.params.max_grad_norm
        entry = self._wrap(model)
        originals: list[torch.Tensor] = list(model.parameters())
        _copy_state(model, entry)
        trainable = [p for p in entry.params if p.requires_grad]
        device = entry.params[0].device if entry.params else torch.device("cpu")
        opt = DPOptimizer(torch.optim.SGD(trainable, lr=lr), noise_multiplier=sigma, max_grad_norm=clip,
                          expected_batch_size=divisor, loss_reduction="mean",
                          generator=_noise_generator(generator, device), secure_mode=self.params.secure_mode)
        try:
            if len(x) == 0:  # an empty Poisson batch: the zero sum plus noise, as DPOptimizer releases it
                tensors = _noise_only(entry, opt, divisor)
            else:
                tensors = _dp_steps(entry, opt, batches, kind, originals)
        except BaseException:
            self._wrapped.pop(model, None)  # never reuse a copy left in an unknown state
            raise
        finally:
            opt.zero_grad(set_to_none=True)  # drop per-sample gradients
        names = [n for n, _ in model.named_parameters()]
        extra: dict[str, Any] = ({"local_epochs": settings.local_epochs, "local_batch_size": settings.local_batch_size}
                                 if epochs else {})
        return SharedUpdate(tensors=tensors, names=names, kind=kind, batch_size=len(x),
                            local_steps=steps if kind == "delta" else 1, lr=lr,
                            meta=self._meta(sigma, clip, divisor, steps, entry), **extra)

    def _meta(self, sigma: float, clip: float, batch_size: int, steps: int, entry: _Wrapped) -> dict[str, Any]:
        """What the server is told about the mechanism that produced the update."""
        meta: dict[str, Any] = {
            "noise_multiplier": sigma, "max_grad_norm": clip,
            "noise_std": sigma * clip / batch_size,  # per-coordinate std of the noise in one averaged gradient
            "dp_steps": steps, "accountant": self.params.accountant, "secure_mode": self.params.secure_mode,
        }
        if self.params.target_epsilon > 0:
            meta["target_epsilon"] = self.params.target_epsilon
            meta["calibration"] = dict(self._calibration or {})
        if entry.fixed:
            meta["model_fixed"] = entry.fixed
        return meta


def _copy_state(model: nn.Module, entry: _Wrapped) -> None:
    """Copy the caller's parameters and buffers into the private wrapped copy."""
    with torch.no_grad():
        for lp, p in zip(entry.params, model.parameters()):
            lp.copy_(p)
        local_buffers = dict(entry.local.named_buffers())
        for n, b in model.named_buffers():
            if n in local_buffers:
                local_buffers[n].copy_(b)


def poisson_rate(n: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a client of ``n`` samples and batch size b: 1/⌈n/b⌉ (``DPDataLoader``)."""
    return 1.0 / max(1, -(-n // max(1, batch_size)))


def steps_per_epoch(q: float) -> int:
    """Batches per epoch of Opacus' ``UniformWithReplacementSampler`` at rate ``q``: ``int(1/q)``."""
    return max(1, int(1 / q))


def _poisson_batches(x: torch.Tensor, y: torch.Tensor,
                     settings: RoundSettings) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """FedAvg under DP-SGD: E epochs of Poisson batches drawn from the client's data by Opacus'
    ``UniformWithReplacementSampler`` (rate 1/⌈n/b⌉, from ``settings.order_seed``; a batch may be
    empty), and Opacus' divisor, the expected batch size ``int(n·q)``."""
    from opacus.utils.uniform_sampler import UniformWithReplacementSampler

    n = len(x)
    q = poisson_rate(n, settings.local_batch_size)
    gen = torch.Generator().manual_seed(settings.order_seed)
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, generator=gen)
    batches = []
    for _ in range(settings.local_epochs):
        for idx in sampler:
            index = torch.as_tensor(idx, dtype=torch.long)
            batches.append((x[index.to(x.device)], y[index.to(y.device)]))
    return batches, max(1, int(n * q))


def _noise_only(entry: _Wrapped, opt: Any, divisor: int) -> list[torch.Tensor]:
    """FedSGD on an empty batch: what ``DPOptimizer.pre_step`` makes of a zero sum of clipped
    gradients — N(0, (σ·C)²) per coordinate of each trainable parameter, drawn by Opacus'
    ``_generate_noise`` from the optimizer's generator in its parameter order, divided by the
    expected batch size. A forward pass on zero samples is skipped: many layers reject it and
    the mean loss over nothing is NaN."""
    from opacus.optimizers.optimizer import _generate_noise

    std = opt.noise_multiplier * opt.max_grad_norm
    noise = {id(p): _generate_noise(std=std, reference=p.detach(), generator=opt.generator, secure_mode=opt.secure_mode)
             for p in opt.params}
    return [noise[id(lp)] / divisor if id(lp) in noise else torch.zeros_like(lp) for lp in entry.params]


def _dp_steps(entry: _Wrapped, opt: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], kind: str,
              originals: list[torch.Tensor]) -> list[torch.Tensor]:
    """Run the client's DP-SGD steps (one per batch) on the wrapped copy; the shared tensors (noised
    gradient or delta)."""
    from defenda.federation.client import loss_fn

    with torch.enable_grad(), warnings.catch_warnings():
        # the inputs do not require grad: torch warns about Opacus' full backward hooks
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for bx, by in batches:
            opt.zero_grad(set_to_none=True)
            loss_fn(entry.gsm(bx), by).backward()
            if kind == "gradient":
                opt.pre_step()  # clip, accumulate, noise, scale: p.grad is what is shared
            else:
                opt.step()
    if kind == "gradient":
        return [lp.grad.detach().clone() if lp.grad is not None else torch.zeros_like(lp) for lp in entry.params]
    return [(lp.detach() - p.detach()).clone() for lp, p in zip(entry.params, originals)]


def _check_accounting(steps: int, sample_rate: float, delta: float) -> None:
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
