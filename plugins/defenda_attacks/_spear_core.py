"""SPEAR's algebra as plain tensor functions (no plugin machinery).

Dimitrov, Baader, Müller, Vechev, "SPEAR: Exact Gradient Inversion of Batches
in Federated Learning", NeurIPS 2024.

Setting. A layer ``Z = W X + b 1ᵀ`` followed by ReLU, with ``W`` m×n, the batch
``X`` n×B (columns are samples) and ``G = ∂L/∂Z`` (m×B). The server knows
``W``, ``b`` and observes ``∂L/∂W = G Xᵀ`` (m×n, rank B) and ``∂L/∂b = G 1``.
For any factorisation ``∂L/∂W = L R`` (here ``L = U_B S_B``, ``R = V_Bᵀ``) there
is an invertible ``Q`` (B×B) with ``G = L Q`` and ``Xᵀ = Q⁻¹ R``. ReLU makes
``G`` sparse: ``G[r, i] = 0`` whenever neuron r is inactive for sample i.

Recovery, in this implementation (float64 throughout), one function per stage,
run in order by :func:`spear_recover`:

1. ``_factorise`` / ``_layer_problem``: SVD of ``∂L/∂W`` (a sketched one when the rank is
   below the sketch, ``_low_rank_svd``: 25 s → 1 s at 2000×3072); the batch size is the
   numerical rank unless given; dead neurons (zero rows) are excluded.
2. ``_peel`` — *peeling* (exact, polynomial; not in the paper). A row r of the
   gradient that only one sample j activates gives that sample exactly:
   ``x_j = (∂L/∂W)[r] / (∂L/∂b)[r]``. Every such candidate is verified exactly
   (below); verified samples are subtracted from the gradient
   (``∂L/∂W −= g_j x_jᵀ``, ``∂L/∂b −= g_j``), which turns rows they shared with one
   other sample into new single-sample rows. A candidate that mixes in a little of
   another found sample is purified exactly (``_purify``). Real images are
   correlated, so a neuron's activity across a batch is close to a threshold on
   one direction and single-sample rows are common: digits batches of B = 4…48
   peel completely in 2–5 rounds.
3a. ``_dl_seed`` — *dictionary learning* (SPEAR++'s formulation: Bakarsky, Dimitrov, Baader,
   Vechev, arXiv 2510.24200; our implementation in :mod:`defenda_attacks._spear_dl`), on what
   peeling leaves when B' ≥ ``dl_min_batch``: ℓ1 on the sphere (class-sign corrected where the
   layer feeds the logits), Riemannian subgradient steps, float64 null-space rounding; only
   certified columns (exact zeros ≥ the sparsity threshold, nullity one) enter the pool.
   Its budget is counted in iterations. Sampling is then skipped when B' > ``sample_max_batch``.
3. ``_sample`` / ``_search`` — *sampling* (the paper's search), on what peeling
   leaves (B' samples): random (B'−1)-row submatrices of ``L``; the null vector
   ``q`` of each is a column of ``Q`` when all rows are inactive for one sample.
   Proposals are solved in vectorised chunks (batched LU in torch), rejected early
   on a probe of rows, filtered by the sparsity of ``L q`` (threshold calibrated to
   the number of alive neurons), deduplicated, and kept only when their zero set
   is maximal.
4. ``_select`` / ``_swap`` — *selection*: greedy by sparsity, then swaps scored by
   the number of samples that pass the exactness test. The last two columns need
   no sampling (``_complete``): with B'−1 columns known the last sample follows
   from the bias gradient; with B'−2 the two missing samples lie on a known line,
   scanned once (``_two_missing``).
4b. ``_head_complete`` — *head completion* (our own, not in the papers): where the layer feeds a
   K-class softmax head directly, each found column fixes its sample's label and probability
   ratios, which are linear equations in its input once the active set is known; with up to
   K − 3 columns still missing (7 for 10 classes, against 2 above) every found sample's input
   is solved (:mod:`defenda_attacks._spear_head`), verified exactly and subtracted like a peeled
   one. With more columns missing, the rows on which every missing sample is in the same state
   (all inactive, or all active: there their columns are ``W₂ᵀ v``) make the found samples'
   dual rows a linear regression, fitted by alternating trimmed least squares from each found
   sample's mask (``shared_state_inputs``: a cluster of similar inputs, which ℓ1 cannot separate,
   is exactly this case). Peeling then goes on (the samples left are rarely all active on a neuron), and what
   remains is searched again with the sparsity threshold at its floor (the last samples are
   the densest: inactive on under 10% of the rows their residual leaves alive).
5. ``_final_batch``: scale and sign of each column from ``∂L/∂b = L Q 1``; inputs
   ``Xᵀ = Q⁻¹ R``, recomputed in the full basis once every column is known.

Exactness test (the ReLU-consistency score). A candidate input ``x`` is exact
when the alive rows on which ``W x + b < 0`` span at most B−1 dimensions of the
row space of ``L`` (their null vector is then the column ``q`` of that sample)
and the zero set of ``L q`` agrees with the inactive set of ``x``. Wrong
candidates fail it; the count of samples that pass is ``n_exact``.

Under noise (DP, noise defenses) no test passes; peeling then accepts rows whose
candidate is nearly consistent (``_approx_peel``) and the attack returns the best
batch it can assemble (``_fallback_batch`` when the search finds none: missing
columns filled with directions orthogonal to the found ones, and ``Q`` inverted
Tikhonov-regularised so a near-singular ``Q`` cannot blow the inputs up), flagged
as approximate. The plugin clips non-exact samples to the input box (images) or
to ``|x| ≤ approx_bound`` (tabular, model space).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from defenda import param
from defenda_attacks._linalg import estimate_rank, solve
from defenda_attacks._spear_dl import DLConfig, approximate_columns, dl_columns
from defenda_attacks._spear_head import head_inputs, max_missing, shared_state_inputs

__all__ = ["SpearParams", "SpearResult", "spear_recover", "sparsity_threshold", "verify_inputs"]

# Rows of the rotated basis that pre-screen each chunk of proposals before the full sparsity count.
_PROBE_ROWS = 64
# Most trial swaps the selection stage scores before it settles for the batch it has.
_MAX_SWAPS = 100
#: The sampling search's work budget (proposals). Counted in work, not seconds, so the same
#: inputs give the same batch on any machine and under any load; 5·10⁵ proposals take about
#: 3–5 s on one core at B' = 16–24 (the cost of one proposal grows with B'), the 5 s wall-clock
#: budget the default studies used before.
DEFAULT_MAX_PROPOSALS = 500_000
# The search assembles a batch from its pool at geometrically spaced proposal counts (each
# checkpoint this factor beyond the last), so assembly stays a small share of the work
# whatever the pool does, and where it happens depends only on the proposals tried.
_ASSEMBLE_GROWTH = 1.25
# Tikhonov weight of the approximate (noisy) assembly, relative to the largest singular value
# of Q: a near-singular Q would otherwise amplify the noise without bound (inputs of 1e15).
# 0.1 measured on breast-cancer B = 4 (quantize 2 bits, prune 0.99, noise 0.1): max |x̂| 10²–10³
# → 5–22 before clipping; digits B = 8 under relative noise 0.1–1 gains 0–2 dB; 0.3 and 1
# shrink further toward the blank guess without a consistent gain.
_APPROX_RIDGE = 0.1


@dataclass(frozen=True)
class SpearParams:
    """SPEAR's parameters: the plugin's ``Spear.Params`` and the knobs of :func:`spear_recover`.

    :func:`spear_recover` reads the search fields (``max_proposals`` … ``approx_max_proposals``);
    the plugin alone reads the rest (layer choice, labels, CNN feature inversion).
    ``rank_tol`` / ``zero_tol`` 0 pick them from the gradient's precision (1e-10 / 1e-8 for
    float64, 1e-5 / 1e-5 below); ``sparsity_threshold`` 0 means calibrated: the
    ``false_rejection`` quantile of Binomial(alive, p). The search stops after ``max_proposals``
    proposals (a budget in work: deterministic); ``time_budget_s`` > 0 adds a wall-clock cap
    that makes results depend on machine load (off by default).
    """

    max_proposals: int = param(
        DEFAULT_MAX_PROPOSALS, "most (B-1)-row submatrices the sampling stage tries (the work budget)"
    )
    time_budget_s: float = param(
        0.0, "optional wall-clock safety cap in seconds (0 = none); when set, results depend on machine load"
    )
    chunk_size: int = param(4096, "proposals solved together in one vectorised chunk")
    rank_tol: float = param(0.0, "relative singular-value cut for the batch size (0: 1e-10 float64, 1e-5 float32)")
    zero_tol: float = param(0.0, "relative size below which an entry of G counts as zero (0: by precision)")
    sparsity_threshold: float = param(
        0.0, "share of alive neurons a column of G must be zero on (0: calibrated binomial quantile)"
    )
    false_rejection: float = param(1e-9, "false-rejection rate that calibrates the sparsity threshold")
    min_sparsity: float = param(0.05, "weakest candidate kept in the pool, as a share of alive neurons")
    peel: bool = param(True, "peel off samples from neurons that a single remaining sample activates")
    dictionary_learning: bool = param(
        True, "search the columns of G as sparse directions (SPEAR++-style l1 on the sphere) before sampling"
    )
    dl_iterations: int = param(150, "subgradient steps per dictionary-learning round (the search's work budget)")
    dl_rounds: int = param(3, "dictionary-learning rounds with fresh starting directions while columns are missing")
    dl_starts: int = param(0, "starting directions per dictionary-learning round (0: 2*B'+32)")
    dl_rho: float = param(10.0, "penalty on entries of the wrong class sign (class-sign correction)")
    dl_min_batch: int = param(
        16, "smallest residual batch B' the dictionary-learning stage runs on (below it sampling is cheap)"
    )
    head_completion: bool = param(
        True, "where the layer feeds a softmax head, solve found samples' inputs with up to K-3 columns "
              "missing, or more beside a cluster of similar missing samples"
    )
    sample_max_batch: int = param(
        32, "largest residual batch B' the sampling stage is tried on (its success rate falls like 2^-B')"
    )
    approx_max_proposals: int = param(20_000, "proposal budget when the update is noisy (no exact structure)")
    approx_rho: float = param(
        3.0, "wrong-class-sign penalty of the noisy update's direction search (softer than dl_rho: noise blurs signs)"
    )
    approx_bound: float = param(
        10.0, "without an input box, non-exact samples are clipped to |x| <= this (model space: feature SDs)"
    )
    layer: str = param("", "name of the Linear layer to attack (empty: the first Linear followed by ReLU)")
    recover_labels: bool = param(True, "recover labels from the per-sample gradients (when the layer is found)")
    feature_inversion_steps: int = param(300, "Adam steps inverting recovered CNN features to images (0: off)")
    feature_inversion_lr: float = param(0.05, "Adam learning rate of the feature inversion")
    feature_inversion_tv: float = param(0.1, "total-variation weight of the feature inversion (image prior)")
    features_in_info: bool = param(True, "store recovered CNN features in info['features'] (lists of floats)")
    refine_iterations: int = param(
        400, "on a noisy update, Adam steps fitting the batch to the whole update by least squares (0: off)"
    )
    refine_lr: float = param(0.1, "Adam learning rate of the least-squares refinement (model-space units)")


@dataclass
class SpearResult:
    """What :func:`spear_recover` found.

    :ivar inputs: ``(B̂, n)`` float64, the recovered layer inputs (one per row).
    :ivar grad_z: ``(m, B̂)`` the per-sample ``∂L/∂z`` columns (``G``), or None.
    :ivar exact: ``(B̂,)`` bool, samples that passed the exactness test.
    :ivar batch_size: B̂, the batch size used (given or estimated from the rank).
    :ivar rank: the numerical rank of ``∂L/∂W``.
    :ivar proposals: submatrices tried by the sampling stage.
    :ivar timings: seconds per stage.
    :ivar approximate: True when not every sample is exact (a noisy update, or a partial recovery).
    :ivar noisy: True when the gradient had no exact low-rank structure (noise: nothing can be exact).
    :ivar n_dl_columns: columns of ``G`` the dictionary-learning stage certified (of B − n_peeled).
    :ivar dl_iterations: its subgradient steps, summed over rounds and class patterns (the work done).
    :ivar n_head: samples whose inputs the softmax head solved while columns were still missing
        (:mod:`defenda_attacks._spear_head`); peeling and the search find the rest.
    """

    inputs: torch.Tensor
    grad_z: torch.Tensor | None
    exact: torch.Tensor
    batch_size: int
    rank: int
    proposals: int = 0
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    n_peeled: int = 0
    n_sampled: int = 0
    approximate: bool = False
    message: str = ""
    noisy: bool = False
    n_dl_columns: int = 0
    dl_iterations: int = 0
    n_head: int = 0

    @property
    def n_exact(self) -> int:
        return int(self.exact.sum())


# ---------------------------------------------------------------------------- stage records


class _Problem(NamedTuple):
    """The layer's gradients and weights in float64 on the CPU; the gradients divided by ``scale``."""

    dW: torch.Tensor  # (m, n)
    db: torch.Tensor  # (m,)
    W: torch.Tensor  # (m, n)
    b: torch.Tensor  # (m,)
    scale: float


class _Rank(NamedTuple):
    """Stage 1: the SVD of ``∂L/∂W``, its numerical rank and the batch size B used."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    rank: int
    B: int
    clean: bool  # the singular values drop below the tolerance after B: an exact (noise-free) update


class _Peeled(NamedTuple):
    """Stage 2: the samples peeled off and the gradient they leave."""

    X: list[torch.Tensor]  # inputs (n,)
    G: list[torch.Tensor]  # their G columns (m,)
    RW: torch.Tensor  # residual ∂L/∂W
    Rb: torch.Tensor  # residual ∂L/∂b


class _Residual(NamedTuple):
    """The rank-B' problem the sampling stage solves: what peeling left."""

    U: torch.Tensor  # (m, B')
    S: torch.Tensor  # (B',)
    Vh: torch.Tensor  # (B', n)
    Rb: torch.Tensor  # residual ∂L/∂b
    alive: torch.Tensor  # rows some remaining sample activates
    n_alive: int
    Bp: int


class _Limits(NamedTuple):
    tau: int  # zero count a true column of G exceeds (sparsity filter)
    floor: int  # weakest zero count kept in the pool
    budget: int  # proposals to try


class _Batch(NamedTuple):
    """Inputs ``X`` (k×n) and G columns (m×k) of a candidate batch; ``n_ok`` of its samples are exact."""

    n_ok: int
    X: torch.Tensor
    G: torch.Tensor


class _Search(NamedTuple):
    best: _Batch | None
    message: str
    t_assemble: float


class _Sampled(NamedTuple):
    """Stages 3–4: the samples the search recovered from the residual."""

    X: torch.Tensor
    G: torch.Tensor
    n_sampled: int
    proposals: int
    approximate: bool
    message: str
    t_solve: float
    t_filter: float
    t_assemble: float
    n_dl: int = 0
    dl_iterations: int = 0
    t_dl: float = 0.0
    n_head: int = 0


class _Final(NamedTuple):
    X: torch.Tensor
    G: torch.Tensor
    exact: torch.Tensor


# ---------------------------------------------------------------------------- helpers


def _out_of_time(t_start: float, budget_s: float) -> bool:
    """The optional wall-clock cap (``budget_s`` ≤ 0: none, so the work budget alone decides)."""
    return budget_s > 0 and time.perf_counter() - t_start > budget_s


def _precision_tols(dtype: torch.dtype) -> tuple[float, float]:
    """(rank_tol, zero_tol) suited to the precision the gradient was computed in."""
    if dtype == torch.float64:
        return 1e-10, 1e-8
    return 1e-5, 1e-5



def sparsity_threshold(n_alive: int, p_inactive: float = 0.5, false_rejection: float = 1e-9) -> int:
    """Zero count a true column of ``G`` exceeds with probability 1 − ``false_rejection``.

    The lower ``false_rejection`` quantile of Binomial(``n_alive``, ``p_inactive``):
    about 0.40·n for 1000 alive neurons, 0.29·n for 200.
    """
    if n_alive <= 0:
        return 0
    from scipy.stats import binom

    k = int(binom.ppf(false_rejection, n_alive, p_inactive))
    return max(k, 0)


def _nullvec(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vector of the smallest singular value of ``M`` (k×B), and the singular values."""
    if M.shape[0] == 0:
        v = torch.zeros(M.shape[1], dtype=M.dtype)
        v[0] = 1
        return v, torch.zeros(M.shape[1], dtype=M.dtype)
    # the full V is needed only when M has fewer rows than columns (its null space is then wider)
    _, s, vh = torch.linalg.svd(M, full_matrices=M.shape[0] < M.shape[1])
    full = torch.zeros(M.shape[1], dtype=M.dtype)
    full[: s.numel()] = s
    return vh[-1], full


class _Full:
    """The full problem: SVD basis, the layer's W, b, alive rows, tolerances."""

    def __init__(self, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                 alive: torch.Tensor, zero_tol: float) -> None:
        self.U, self.S, self.Vh = U, S, Vh
        self.W, self.b = W, b
        self.alive = alive
        self.B = U.shape[1]
        self.zero_tol = zero_tol
        self.rownorm = U.norm(dim=1).clamp_min(1e-300)
        Ua = U * alive[:, None]
        self.outer = (Ua[:, :, None] * Ua[:, None, :]).reshape(U.shape[0], -1)  # m × B²
        self.smin_tol = 10 * zero_tol
        self.z_tol = zero_tol
        # in float32 a few genuinely small entries of G sit near the zero threshold
        self.clash_slack = 0 if zero_tol < 1e-6 else min(2, int(0.005 * int(alive.sum())))

    def verify(self, X: torch.Tensor, *, want_nullity_one: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Exactness test for candidate inputs ``X`` (C×n).

        :returns: ``ok`` (C,) bool and the unit null vectors ``qt`` (C×B) in the
            basis of ``U`` (the G column is ``U @ qt``), zero rows where not ok.
        """
        C = X.shape[0]
        B = self.B
        ok = torch.zeros(C, dtype=torch.bool)
        qt = torch.zeros(C, B, dtype=torch.float64)
        if C == 0:
            return ok, qt
        Z = X @ self.W.T + self.b
        zs = Z.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
        inact = (Z < -self.z_tol * zs) & self.alive
        act = (Z > self.z_tol * zs) & self.alive
        cnt = inact.sum(1)
        gram = (inact.to(torch.float64) @ self.outer).reshape(C, B, B)
        lam = torch.linalg.eigvalsh(gram)
        # eigenvalues of a Gram matrix are accurate to ~1e-16 of the largest; exact nullity shows as λ ≈ 0
        pre = (lam[:, 0] < max(4 * self.smin_tol**2, 1e-13)) & (cnt >= B - 1)
        for c in torch.nonzero(pre).flatten().tolist():
            M = self.U[inact[c]]
            v, s = _nullvec(M)
            if s[-1] > self.smin_tol:
                continue
            if want_nullity_one and B >= 2 and s[-2] <= self.smin_tol:
                continue  # the inactive rows do not pin the column down
            g = self.U @ v
            zero = (g.abs() <= self.zero_tol * self.rownorm) & self.alive
            clash = int((zero & act[c]).sum())
            if clash > self.clash_slack:
                continue
            ok[c] = True
            qt[c] = v
        return ok, qt

    def g_column(self, x: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
        """The scaled G column of an exact sample ``x`` with null vector ``qt``: ``a_jᵀ q_j = 1``."""
        a = self.Vh @ x  # coordinates of x in the row space
        q = qt / self.S
        denom = a @ q
        return (self.U @ qt) / denom


def verify_inputs(dW: torch.Tensor, W: torch.Tensor, b: torch.Tensor, X: torch.Tensor, *, batch_size: int | None = None,
                  rank_tol: float | None = None, zero_tol: float | None = None) -> torch.Tensor:
    """Which rows of ``X`` (k×n) are exact inputs of the batch that produced ``dW`` (bool per row)."""
    rt, zt = _precision_tols(dW.dtype)
    rank_tol = rank_tol or rt
    zero_tol = zero_tol or zt
    dW = dW.detach().to(torch.float64)
    U, S, Vh = _low_rank_svd(dW, batch_size, rank_tol)
    B = batch_size or estimate_rank(S, rank_tol)
    alive = dW.abs().amax(1) > 0
    full = _Full(U[:, :B], S[:B], Vh[:B], W.detach().double(), b.detach().double(), alive, zero_tol)
    return full.verify(X.detach().double())[0]


def _group(X: torch.Tensor, rel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Representatives of groups of rows of ``X`` closer than ``rel`` (relative), and group sizes."""
    if X.shape[0] <= 1:
        return torch.arange(X.shape[0]), torch.ones(X.shape[0], dtype=torch.long)
    nrm = X.norm(dim=1).clamp_min(1e-300)
    D = torch.cdist(X, X, compute_mode="donot_use_mm_for_euclid_dist")
    close = D <= rel * torch.maximum(nrm[:, None], nrm[None, :])
    first = close.to(torch.int8).argmax(dim=1)
    rep, counts = torch.unique(first, return_counts=True)
    return rep, counts


def _purify(Xc: torch.Tensor, Qt: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact inputs and G columns of found samples from candidates that may mix in other found samples.

    Each candidate ``x'_j = Σ_l w_jl x_l`` is an affine combination (``Σ_l w_jl = 1``) dominated by
    its own sample; ``Qt`` (B×F) holds the exact columns of Q (basis of ``U``). With
    ``M = A' Q̂`` (``a' = Vh x'``) and ``v = M⁻¹ 1``: ``a_k = (M⁻¹ A')_k / v_k``, ``q_k = q̂_k v_k``.
    Exact when every sample mixed into a candidate is among the found ones.
    """
    Qh = Qt / S[:, None]  # B × F, columns q̂_k
    Ap = Xc @ Vh.T  # F × B, rows a'_j
    M = Ap @ Qh  # F × F
    try:
        v = torch.linalg.solve(M, torch.ones(M.shape[0], dtype=M.dtype))
        A = torch.linalg.solve(M, Ap) / v[:, None]
    except RuntimeError:
        d = torch.diagonal(M)
        v = 1 / d
        A = Ap
    X = A @ Vh
    G = (U @ Qt) * v[None, :]
    return X, G


def _ridge_solve(A: torch.Tensor, rhs: torch.Tensor, ridge: float) -> torch.Tensor:
    """``argmin ‖A x − rhs‖² + (ridge·s₁)² ‖x‖²`` (s₁ the largest singular value of ``A``), by SVD.

    Each singular direction is amplified by at most ``1 / (2·ridge·s₁)``, so a near-singular ``A``
    gives a bounded answer instead of one blown up by its smallest singular value.
    """
    U, sv, Vh = torch.linalg.svd(A, full_matrices=False)
    lam = ridge * float(sv[0]) if sv.numel() else 0.0
    filt = sv / (sv * sv + lam * lam).clamp_min(1e-300)
    coef = U.T @ rhs
    coef = coef * (filt if coef.ndim == 1 else filt[:, None])
    return Vh.T @ coef


def _assemble(Ghat: torch.Tensor, U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, db: torch.Tensor,
              ridge: float = 0.0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Inputs and scaled G from column directions ``Ghat`` (m×k) in a rank-k problem ``U S Vh``.

    ``q_j = S⁻¹ Uᵀ ĝ_j``; scales from the bias gradient ``Q s = S⁻¹ Uᵀ ∂L/∂b``; ``X = Q⁻¹ Vh``.
    ``ridge`` > 0 (approximate batches only) solves both systems Tikhonov-regularised
    (:func:`_ridge_solve`): exact columns never need it, and it keeps guessed ones bounded.
    """
    Qh = (U.T @ Ghat) / S[:, None]
    if ridge > 0:
        sr = _ridge_solve(Qh, (U.T @ db) / S, ridge)
        sr = torch.where(sr.abs() < 1e-300, torch.full_like(sr, 1e-300), sr)
        Xr = _ridge_solve(Qh * sr[None, :], Vh, ridge)
        if not (bool(torch.isfinite(Xr).all()) and bool(torch.isfinite(sr).all())):
            return None
        return Xr, Ghat * sr[None, :]
    try:
        s = torch.linalg.solve(Qh, (U.T @ db) / S)
    except RuntimeError:
        return None
    s = torch.where(s.abs() < 1e-300, torch.full_like(s, 1e-300), s)
    Q = Qh * s[None, :]
    try:
        X = torch.linalg.solve(Q, Vh)
    except RuntimeError:
        return None
    return X, Ghat * s[None, :]


# ---------------------------------------------------------------------------- sampling helpers


class _Sampler:
    """Random (B'−1)-row submatrices of a rank-B' problem, solved in vectorised chunks.

    Each proposal's null vector comes from one batched LU solve (after a random
    rotation of the basis, so the pivot column is generic); a probe of rows
    rejects most proposals before the full sparsity count.
    """

    def __init__(self, U: torch.Tensor, alive: torch.Tensor, zero_tol: float, probe_rows: int,
                 gen: torch.Generator, tau: int, floor: int, max_pool: int = 4096) -> None:
        self.Bp = U.shape[1]
        self.alive_idx = torch.nonzero(alive).flatten()
        self.Ua = U[self.alive_idx]  # alive rows only
        self.rown = self.Ua.norm(dim=1).clamp_min(1e-300)
        self.zero_tol = zero_tol
        self.probe_rows = probe_rows
        self.gen = gen
        self.tau = tau
        self.floor = floor
        self.max_pool = max_pool
        na = self.Ua.shape[0]
        self.pool_q = torch.zeros(0, self.Bp, dtype=torch.float64)
        self.pool_zero = torch.zeros(0, na, dtype=torch.bool)
        self.pool_count = torch.zeros(0, dtype=torch.long)
        self.pool_hits = torch.zeros(0, dtype=torch.long)
        self.tried = 0
        self.t_solve = 0.0
        self.t_filter = 0.0

    # -- proposals ----------------------------------------------------------------------
    def _proposals(self, C: int, Ur: torch.Tensor, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``C`` unit null vectors (rotated basis) of random (B'−1)-row submatrices, and their probe zero counts."""
        Bp = self.Bp
        na = Ur.shape[0]
        idx = torch.randint(na, (C, Bp - 1), generator=self.gen)
        M = Ur[idx]  # C × (B'−1) × B'
        sol, info = solve(M[:, :, :-1], -M[:, :, -1])
        q = torch.cat([sol, torch.ones(sol.shape[0], 1, dtype=torch.float64)], dim=1)
        q = q[(info == 0) & torch.isfinite(q).all(dim=1)]
        q = q / q.norm(dim=1, keepdim=True)
        self.tried += C
        zp = ((Ur[probe] @ q.T).abs() <= self.zero_tol * self.rown[probe, None]).sum(dim=0)
        return q, zp

    def chunk(self, C: int) -> int:
        """Try about ``C`` proposals; returns how many new pool entries they added."""
        Bp = self.Bp
        na = self.Ua.shape[0]
        t0 = time.perf_counter()
        # a random rotation makes the pivot columns generic
        rot = torch.linalg.qr(torch.randn(Bp, Bp, dtype=torch.float64, generator=self.gen)).Q
        Ur = self.Ua @ rot
        P = min(self.probe_rows, na)
        probe = torch.randperm(na, generator=self.gen)[:P]
        q, zp = self._proposals(C, Ur, probe)
        t1 = time.perf_counter()
        self.t_solve += t1 - t0
        # a true column is zero on a large share of the probe rows, a wrong one on almost none
        need = max(3, int(0.5 * P * self.tau / max(na, 1)))
        surv = q[zp >= need]
        added = 0
        if surv.shape[0]:
            c = Ur @ surv.T  # na × S
            zero = c.abs() <= self.zero_tol * self.rown[:, None]
            cnt = zero.sum(dim=0)
            keep = cnt >= max(self.floor, Bp)
            if bool(keep.any()):
                added = self._add(surv[keep] @ rot.T, zero[:, keep].T, cnt[keep])
        self.t_filter += time.perf_counter() - t1
        return added

    def _add(self, q: torch.Tensor, zero: torch.Tensor, cnt: torch.Tensor) -> int:
        """Merge new columns (deduplicated by |cos| > 1 − 1e-8) into the pool."""
        q = q / q.norm(dim=1, keepdim=True)
        same = (q @ q.T).abs() > 1 - 1e-8
        first = same.to(torch.int8).argmax(dim=1)
        rep, mult = torch.unique(first, return_counts=True)
        q, zero, cnt = q[rep], zero[rep], cnt[rep]
        if self.pool_q.shape[0]:
            cos = (q @ self.pool_q.T).abs()
            best, where = cos.max(dim=1)
            old = best > 1 - 1e-8
            if bool(old.any()):
                self.pool_hits.index_add_(0, where[old], mult[old])
            q, zero, cnt, mult = q[~old], zero[~old], cnt[~old], mult[~old]
        if q.shape[0] == 0:
            return 0
        self.pool_q = torch.cat([self.pool_q, q])
        self.pool_zero = torch.cat([self.pool_zero, zero])
        self.pool_count = torch.cat([self.pool_count, cnt])
        self.pool_hits = torch.cat([self.pool_hits, mult])
        if self.pool_q.shape[0] > self.max_pool:
            keep = torch.argsort(self.pool_count, descending=True)[: self.max_pool]
            self.pool_q, self.pool_zero = self.pool_q[keep], self.pool_zero[keep]
            self.pool_count, self.pool_hits = self.pool_count[keep], self.pool_hits[keep]
        return int(q.shape[0])

    def ordered(self, top: int = 512) -> list[int]:
        """Pool indices whose zero set is maximal (not strictly inside another's), densest zeros first."""
        n = self.pool_q.shape[0]
        if n == 0:
            return []
        key = self.pool_count * (1 << 20) + self.pool_hits.clamp_max((1 << 20) - 1)
        idx = torch.argsort(key, descending=True)[:top]
        Zm = self.pool_zero[idx].to(torch.float64)
        inter = Zm @ Zm.T
        cnt = Zm.sum(dim=1)
        # i is dominated when its zeros are inside j's and j has more
        dom = (inter >= cnt[:, None] - 0.5) & (cnt[None, :] > cnt[:, None] + 0.5)
        return [int(idx[i]) for i in range(idx.numel()) if not bool(dom[i].any())]


def _two_missing(cols: list[torch.Tensor], U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, db: torch.Tensor,
                 full: _Full) -> list[torch.Tensor]:
    """The G columns of the two samples missing when B'−2 columns of Q are known.

    Their dual rows ``a`` lie in the plane orthogonal to the known columns and satisfy
    ``aᵀ Q 1 = 1`` (bias gradient): a line ``a(t)``. Along it each neuron switches at one
    ``t``; the exactness test on one point per interval between switches finds the
    intervals holding the two samples, and their null vectors are the missing columns.
    """
    Bp = U.shape[1]
    if cols:
        _, _, vh = torch.linalg.svd(torch.stack([c / S for c in cols], 0), full_matrices=True)
        T = vh[-2:].T  # Bp × 2: the plane orthogonal to the known columns
    else:
        T = torch.eye(Bp, dtype=torch.float64)[:, :2]
    q1 = (U.T @ db) / S
    c = T.T @ q1
    cn = float(c.norm())
    if cn < 1e-300:
        return []
    a0 = T @ (c / cn**2)
    d = T @ torch.stack([-c[1], c[0]]) / cn
    x0, dx = Vh.T @ a0, Vh.T @ d
    z0 = full.W @ x0 + full.b
    dz = full.W @ dx
    live = full.alive & (dz.abs() > 0)
    tb = torch.sort(-z0[live] / dz[live]).values
    if tb.numel() == 0:
        return []
    span = float(tb[-1] - tb[0]) + 1.0
    ts = torch.cat([tb[:1] - span, (tb[1:] + tb[:-1]) / 2, tb[-1:] + span])
    X = x0[None, :] + ts[:, None] * dx[None, :]
    out: list[torch.Tensor] = []
    for start in range(0, X.shape[0], 512):
        ok, qt = full.verify(X[start : start + 512])
        for v in qt[ok]:
            g = full.U @ v
            if all(abs(float(g @ h)) < (1 - 1e-8) * float(g.norm() * h.norm()) for h in out):
                out.append(g)
    return out


def _greedy_independent(Qs: list[torch.Tensor], order: list[int], k: int, tol: float = 1e-6) -> list[int]:
    """First ``k`` entries of ``order`` whose vectors are linearly independent."""
    basis: list[torch.Tensor] = []
    sel: list[int] = []
    for i in order:
        v = Qs[i].clone()
        for u in basis:
            v = v - (u @ v) * u
        n = float(v.norm())
        if n > tol:
            basis.append(v / n)
            sel.append(i)
            if len(sel) == k:
                break
    return sel


# ---------------------------------------------------------------------------- stage 1: factorisation


def _normalise(dW: torch.Tensor, db: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> _Problem | None:
    """The problem in float64 on the CPU, gradients scaled to max |∂L/∂W| = 1; None for a zero or non-finite update."""
    dW = dW.detach().to(torch.float64).cpu()
    db = db.detach().to(torch.float64).cpu().reshape(-1)
    W = W.detach().to(torch.float64).cpu()
    b = b.detach().to(torch.float64).cpu().reshape(-1)
    scale = float(dW.abs().max())
    if scale == 0 or not math.isfinite(scale):
        return None
    return _Problem(dW / scale, db / scale, W, b, scale)


def _low_rank_svd(A: torch.Tensor, k_hint: int | None, rank_tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leading SVD of ``A``: exact when ``A`` has a numerical rank below the sketch size, else the full SVD.

    A full SVD of a 2000×3072 gradient costs ~25 s on two cores, yet an exact gradient has rank
    B ≪ m: the range of ``A Ω`` (Ω a fixed Gaussian n×k, k > B) is then the column space of
    ``A`` to float64 rounding, and the SVD of ``Pᵀ A`` (k×n) gives its singular triplets. The
    sketch grows until the spectrum drops below ``rank_tol`` inside it (an exact low rank); a
    noisy update never does and gets the full SVD, whose tail the rank estimate needs.
    """
    m, n = A.shape
    full = min(m, n)
    k = min(full, max(2 * (k_hint or 32) + 16, 64))
    gen = torch.Generator().manual_seed(0)  # fixed sketch: same inputs, same bits
    while k < full // 2:
        P = torch.linalg.qr(A @ torch.randn(n, k, dtype=A.dtype, generator=gen)).Q
        Ub, S, Vh = torch.linalg.svd(P.T @ A, full_matrices=False)
        if float(S[-1]) <= rank_tol * float(S[0]):
            return P @ Ub, S, Vh
        k *= 2
    return torch.linalg.svd(A, full_matrices=False)


def _factorise(dW: torch.Tensor, batch_size: int | None, rank_tol: float) -> _Rank:
    """SVD of ``∂L/∂W`` and the batch size: the given one, unless the spectrum shows an exact lower rank."""
    U, S, Vh = _low_rank_svd(dW, batch_size, rank_tol)
    rank = estimate_rank(S, rank_tol)
    B = rank if batch_size is None else min(int(batch_size), S.numel())
    if batch_size is not None and rank < B and rank < S.numel() and float(S[rank]) <= rank_tol * float(S[0]):
        B = rank  # exact gradient of lower rank (duplicate inputs, a sample with zero gradient)
    B = max(B, 1)
    clean = B < S.numel() and float(S[B]) <= rank_tol * float(S[0])
    return _Rank(U, S, Vh, rank, B, clean)


def _too_few_inputs(dW: torch.Tensor, batch_size: int | None) -> str:
    """The reason when the layer has fewer inputs (or neurons) than samples: its rank cannot reach B,
    so the spectrum cannot tell an exact update from a noisy one and no batch is identifiable."""
    if batch_size is None or min(dW.shape) >= batch_size:
        return ""
    return (f"∂L/∂W is {dW.shape[0]}×{dW.shape[1]}, rank ≤ {min(dW.shape)} < batch size {batch_size}: the batch is "
            "not identifiable from this layer (information-limited)")


def _limit_hint(batch_size: int | None, rk: _Rank, n_alive: int, all_exact: bool) -> str:
    """Why a clean update was not recovered in full, when the layer's shape already says so ("" otherwise).

    Rank below B: no low-rank method can separate the samples (information-limited,
    ``spear-scale.md`` §0.1), said even when the rank-B part came out exact. Fewer than 16
    alive neurons a sample: the ℓ1 search is known to find only part of the columns there
    (§0.3, measured m ≥ 16·B for full recovery).
    """
    if batch_size is not None and rk.B < batch_size:
        return (f"∂L/∂W has rank {rk.B} < batch size {batch_size}: the batch is not identifiable from this layer "
                "(information-limited; inputs with more dimensions than samples are needed)")
    if not all_exact and n_alive < 16 * rk.B:
        return (f"{n_alive} alive neurons for {rk.B} samples ({n_alive / rk.B:.1f} a sample, under 16): the ℓ1 "
                "search usually finds only part of the columns; a wider layer or a smaller batch recovers more")
    return ""


def _layer_problem(prob: _Problem, rk: _Rank, zero_tol: float) -> _Full:
    """The rank-B problem with its alive rows and zero tolerance (widened to the noise level when not clean)."""
    alive = (prob.dW.abs().amax(dim=1) > 0) | (prob.db.abs() > 0)
    if not rk.clean:
        # noisy gradient: every row is alive; zeros are only approximate
        alive = torch.ones(prob.dW.shape[0], dtype=torch.bool)
        S, B = rk.S, rk.B
        noise = float(S[B] / S[B - 1]) if B < S.numel() else 1.0
        zero_tol = max(zero_tol, min(0.5, 3 * noise))
    return _Full(rk.U[:, : rk.B], rk.S[: rk.B], rk.Vh[: rk.B], prob.W, prob.b, alive, zero_tol)


# ---------------------------------------------------------------------------- stage 2: peeling


def _peel(prob: _Problem, full: _Full, clean: bool, params: SpearParams, t_start: float) -> _Peeled:
    """Samples from single-sample rows: verified exactly on a clean update, approximately under noise."""
    if params.peel and clean:
        return _exact_peel(prob, full, t_start, params.time_budget_s)
    if params.peel:
        found_x, found_g = _approx_peel(full, prob.dW, prob.db, full.B, t_start, params.time_budget_s)
        if found_x:
            RW = prob.dW - torch.stack(found_g, 1) @ torch.stack(found_x)
            Rb = prob.db - torch.stack(found_g, 1).sum(1)
            return _Peeled(found_x, found_g, RW, Rb)
    return _Peeled([], [], prob.dW.clone(), prob.db.clone())


def _exact_peel(prob: _Problem, full: _Full, t_start: float, budget_s: float,
                start: _Peeled | None = None) -> _Peeled:
    """Rounds of: candidates from single-sample rows, exactness test, purification, subtraction.

    ``start``: exact samples already found (and subtracted) by another route; peeling goes on from them.
    """
    dW, db, B, zero_tol = prob.dW, prob.db, full.B, full.zero_tol
    found_x: list[torch.Tensor] = list(start.X) if start else []
    found_g: list[torch.Tensor] = list(start.G) if start else []
    RW, Rb = (start.RW, start.Rb) if start else (dW.clone(), db.clone())
    cand_x: list[torch.Tensor] = list(found_x)  # each an affine combination of true samples, dominated by one
    # its exact column of Q (unit, in the basis of full.U)
    cand_q: list[torch.Tensor] = list(full.verify(torch.stack(found_x))[1]) if found_x else []
    rows = full.alive.clone()
    row_ref = dW.norm(dim=1).clamp_min(1e-300)
    while len(cand_x) < B:
        if _out_of_time(t_start, budget_s):
            break
        Xc, counts = _row_candidates(full, RW, Rb, rows & (RW.norm(dim=1) > 10 * zero_tol * row_ref), cand_x)
        if Xc.shape[0] == 0:
            break
        ok, qt = full.verify(Xc)
        if not bool(ok.any()):
            break
        if not _add_candidates(Xc[ok], qt[ok], counts[ok], cand_x, cand_q, B):
            break
        Xf, Gf = _purify(torch.stack(cand_x), torch.stack(cand_q, 1), full.U, full.S, full.Vh)
        RW_new = dW - Gf @ Xf
        Rb_new = db - Gf.sum(1)
        # only rows the new samples changed can have become single-sample rows
        rows = full.alive & ((RW_new - RW).norm(dim=1) > 10 * zero_tol * row_ref)
        RW, Rb = RW_new, Rb_new
        found_x, found_g = list(Xf), list(Gf.T)
    return _Peeled(found_x, found_g, RW, Rb)


def _row_candidates(full: _Full, RW: torch.Tensor, Rb: torch.Tensor, rows: torch.Tensor,
                    known: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct candidates ``RW[r] / Rb[r]`` from ``rows`` not among ``known``, and how many rows give each."""
    ridx = torch.nonzero(rows & (Rb.abs() > 0)).flatten()
    if ridx.numel() == 0:
        return torch.zeros(0, RW.shape[1], dtype=RW.dtype), torch.zeros(0, dtype=torch.long)
    Xc = RW[ridx] / Rb[ridx, None]
    # a row gives its own sample only if that sample activates it
    Xc = Xc[(full.W[ridx] * Xc).sum(1) + full.b[ridx] > 0]
    if Xc.shape[0] == 0:
        return Xc, torch.zeros(0, dtype=torch.long)
    # candidates lie in the row space of Vh, where distances are those of their B coordinates:
    # grouping there costs B instead of n per pair (n = 3072 for 32×32 RGB)
    coords = Xc @ full.Vh.T
    rep, counts = _group(coords, 1e-9)
    Xc, coords = Xc[rep], coords[rep]
    if known:
        kc = torch.stack(known) @ full.Vh.T
        d = torch.cdist(coords, kc, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
        far = d > 1e-9 * Xc.norm(dim=1).clamp_min(1e-300)
        Xc, counts = Xc[far], counts[far]
    return Xc, counts


def _add_candidates(Xn: torch.Tensor, qn: torch.Tensor, cn: torch.Tensor, cand_x: list[torch.Tensor],
                    cand_q: list[torch.Tensor], B: int) -> int:
    """Append verified candidates of new columns of Q to ``cand_x`` / ``cand_q``; returns how many."""
    added = 0
    # one candidate per column of Q (same sample): the one most rows agree on
    for i in torch.argsort(cn, descending=True).tolist():
        if any(abs(float(qn[i] @ q)) > 1 - 1e-9 for q in cand_q):
            continue
        cand_x.append(Xn[i])
        cand_q.append(qn[i])
        added += 1
        if len(cand_x) >= B:
            break
    return added


def _approx_peel(full: _Full, dW: torch.Tensor, db: torch.Tensor, B: int, t_start: float, budget_s: float,
                 accept: float = 1e-3) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Peeling for noisy gradients: approximate samples from rows a single sample dominates.

    A candidate ``x = ∂L/∂W[r] / ∂L/∂b[r]`` is scored by the smallest eigenvalue of the
    Gram matrix of ``U`` on its inactive rows, relative to the mean eigenvalue (about 0
    for a true sample, the noise level squared under noise). Candidates below ``accept``
    are grouped by their null vector; each group's sample is the least-squares fit
    ``x = Σ b_r w_r / Σ b_r²`` over its rows, then subtracted from the gradient.
    """
    found_x: list[torch.Tensor] = []
    found_g: list[torch.Tensor] = []
    RW, Rb = dW.clone(), db.clone()
    for _ in range(B):
        if len(found_x) >= B or _out_of_time(t_start, budget_s):
            break
        scored = _approx_candidates(full, RW, Rb, found_x, accept)
        if scored is None:
            break
        rows_of, qs = scored
        groups, heads = _group_by_column(qs)
        new = 0
        for gi, members in enumerate(groups):
            if len(found_x) >= B:
                break
            rows = rows_of[members]
            x = (Rb[rows, None] * RW[rows]).sum(0) / Rb[rows].pow(2).sum().clamp_min(1e-300)
            qt = heads[gi]
            a = full.Vh @ x
            denom = float(a @ (qt / full.S))
            if not math.isfinite(denom) or abs(denom) < 1e-300:
                continue
            g = (full.U @ qt) / denom
            found_x.append(x)
            found_g.append(g)
            RW = RW - g[:, None] * x[None, :]
            Rb = Rb - g
            new += 1
        if not new:
            break
    return found_x, found_g


def _approx_candidates(full: _Full, RW: torch.Tensor, Rb: torch.Tensor, found_x: list[torch.Tensor],
                       accept: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows whose candidate scores below ``accept``, best first, and their approximate null vectors."""
    W, b, Bd = full.W, full.b, full.B
    Xc = RW / Rb[:, None]
    ok = torch.isfinite(Xc).all(dim=1) & (Rb.abs() > 0)
    ok &= (W * Xc).sum(1) + b > 0
    if found_x:
        F = torch.stack(found_x)
        d = torch.cdist(Xc.nan_to_num(), F, compute_mode="donot_use_mm_for_euclid_dist").amin(dim=1)
        ok &= d > 0.05 * F.norm(dim=1).mean()
    ridx = torch.nonzero(ok).flatten()
    if ridx.numel() == 0:
        return None
    Z = Xc[ridx] @ W.T + b
    inact = Z < 0
    gram = (inact.to(torch.float64) @ full.outer).reshape(-1, Bd, Bd)
    lam, vec = torch.linalg.eigh(gram)
    tr = gram.diagonal(dim1=1, dim2=2).sum(-1) / Bd
    score = lam[:, 0] / tr.clamp_min(1e-300)
    # fewer than B−1 inactive rows cannot pin a column down
    score = torch.where(inact.sum(1) >= Bd - 1, score, torch.full_like(score, math.inf))
    good = torch.nonzero(score < accept).flatten()
    if good.numel() == 0:
        return None
    good = good[torch.argsort(score[good])]
    return ridx[good], vec[good, :, 0]


def _group_by_column(qs: torch.Tensor) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Indices of ``qs`` grouped by |cos| > 0.99 with the group's first (best-scored) vector."""
    groups: list[list[int]] = []
    heads: list[torch.Tensor] = []
    for i in range(qs.shape[0]):
        for gi, h in enumerate(heads):
            if abs(float(h @ qs[i])) > 0.99:
                groups[gi].append(i)
                break
        else:
            heads.append(qs[i])
            groups.append([i])
    return groups, heads


# ---------------------------------------------------------------------------- stages 3–4: sampling and selection


def _residual(prob: _Problem, full: _Full, peeled: _Peeled) -> _Residual:
    """The rank-B' problem of the samples peeling did not find."""
    Bp = full.B - len(peeled.X)
    if peeled.X:
        U2, S2, Vh2 = _low_rank_svd(peeled.RW, Bp, 1e-10) if Bp > 0 else torch.linalg.svd(peeled.RW, full_matrices=False)
        U2, S2, Vh2 = U2[:, :Bp], S2[:Bp], Vh2[:Bp]
        ralive = full.alive & (peeled.RW.norm(dim=1) > 10 * full.zero_tol * prob.dW.norm(dim=1).clamp_min(1e-300))
    else:
        U2, S2, Vh2, ralive = full.U, full.S, full.Vh, full.alive.clone()
    return _Residual(U2, S2, Vh2, peeled.Rb, ralive, int(ralive.sum()), Bp)


def _search_limits(res: _Residual, params: SpearParams, clean: bool) -> _Limits:
    """Sparsity threshold, pool floor and proposal budget of the search."""
    na, Bp = res.n_alive, res.Bp
    # expected inactive share of a remaining sample on rows some remaining sample activates
    p_cond = 0.5 * (1 - 0.5 ** (Bp - 1)) / (1 - 0.5**Bp) if Bp > 1 else 0.0
    if params.sparsity_threshold > 0:
        tau = int(params.sparsity_threshold * na)
    else:
        tau = sparsity_threshold(na, p_cond, params.false_rejection) if Bp > 1 else 0
    floor = max(int(params.min_sparsity * na), Bp)
    budget = params.max_proposals if clean else min(params.max_proposals, params.approx_max_proposals)
    if Bp > 1 and na >= Bp:
        # few distinct submatrices (small layers, small residuals): sampling each ~20 times is enough
        budget = min(budget, max(params.chunk_size, 20 * math.comb(na, Bp - 1)))
    return _Limits(tau, floor, budget)


def _sample(prob: _Problem, full: _Full, clean: bool, peeled: _Peeled, params: SpearParams,
            gen: torch.Generator, t_start: float, signs: torch.Tensor | None = None,
            head: tuple[torch.Tensor, torch.Tensor] | None = None, relaxed: bool = False) -> _Sampled:
    """The samples peeling left: dictionary learning seeds the pool, sampling completes it (or the best
    approximate batch); where that leaves up to K−3 columns missing the head solves the found samples,
    which are subtracted like peeled ones, and the smaller residual is searched again."""
    res = _residual(prob, full, peeled)
    lim = _search_limits(res, params, clean)
    if relaxed:
        # the samples left after head completion are the densest ones (often inactive on under 10% of
        # the rows): the binomial threshold rejects their columns, and every batch is verified anyway
        lim = lim._replace(tau=lim.floor)
    sampler = _Sampler(res.U, res.alive, full.zero_tol, _PROBE_ROWS, gen, lim.tau, lim.floor)
    t = time.perf_counter()
    n_dl, dl_iters = _dl_seed(sampler, res, lim, params, gen, signs) if clean else (0, 0)
    t_dl = time.perf_counter() - t
    use_head = clean and head is not None and params.head_completion
    tried_head = use_head and n_dl > 0
    if tried_head:
        # the head may already solve the samples dictionary learning found: no sampling needed then
        done = _head_then_rest(prob, full, clean, peeled, params, gen, t_start, signs, head, sampler, res,
                               _Sampled(res.Vh[:0], res.U[:, :0], 0, sampler.tried, False, "", sampler.t_solve,
                                        sampler.t_filter, 0.0, n_dl, dl_iters, t_dl))
        if done is not None:
            return done
    pool_before = sampler.pool_q.shape[0]
    search = _search(sampler, res, full, clean, params, lim.budget, t_start, seeded=n_dl > 0)
    if search.best is not None:
        X, G, n_sampled, approximate = search.best.X, search.best.G, search.best.n_ok, not clean
    else:
        (X, G), n_sampled, approximate = _fallback_batch(sampler, res, gen), 0, True
    out = _Sampled(X, G, n_sampled, sampler.tried, approximate, search.message, sampler.t_solve,
                   sampler.t_filter, search.t_assemble, n_dl, dl_iters, t_dl)
    # the same pool gives the same answer: the head is tried again only on new columns
    if not use_head or n_sampled == res.Bp or (tried_head and sampler.pool_q.shape[0] == pool_before):
        return out
    return _head_then_rest(prob, full, clean, peeled, params, gen, t_start, signs, head, sampler, res, out) or out


def _head_then_rest(prob: _Problem, full: _Full, clean: bool, peeled: _Peeled, params: SpearParams,
                    gen: torch.Generator, t_start: float, signs: torch.Tensor | None,
                    head: tuple[torch.Tensor, torch.Tensor] | None, sampler: _Sampler, res: _Residual,
                    out: _Sampled) -> _Sampled | None:
    """Head completion from the pool, then the rest searched again; None when the head solves nothing."""
    assert head is not None
    solved = _head_complete(prob, full, peeled, sampler, res, head, t_start, params.time_budget_s)
    if solved is None:
        return None
    more, n_head = solved
    rest = _sample(prob, full, clean, more, params, gen, t_start, signs, head, True) if full.B > len(more.X) else None
    return _with_head_samples(out._replace(n_head=out.n_head + n_head), more, len(peeled.X), rest)


def _head_complete(prob: _Problem, full: _Full, peeled: _Peeled, sampler: _Sampler, res: _Residual,
                   head: tuple[torch.Tensor, torch.Tensor], t_start: float, budget_s: float
                   ) -> tuple[_Peeled, int] | None:
    """``peeled`` plus the pool's samples whose inputs the softmax head determines (:mod:`_spear_head`), verified
    exactly and subtracted from the residual gradients, then peeling continued; and how many the head solved.
    None when none is exact."""
    W2, b2 = head
    # certified columns only: one false column corrupts every other sample's solve
    order = [i for i in sampler.ordered() if int(sampler.pool_count[i]) >= sampler.tau]
    sel = _greedy_independent(list(sampler.pool_q), order, res.Bp)
    if not sel or len(sel) >= res.Bp:
        return None
    # to float64 precision: the null vector of each column's zero set (the search's rounding is regularised)
    cols = torch.stack([_nullvec(sampler.Ua[sampler.pool_zero[i]])[0] for i in sel])
    Ua, R = res.U * res.alive[:, None], res.S[:, None] * res.Vh
    if res.Bp - len(sel) <= max_missing(W2.shape[0]):
        Xc = head_inputs(cols, Ua, R, full.W, full.b, W2, b2, full.zero_tol)
    else:
        Xc = shared_state_inputs(cols, Ua, R, res.U.T @ res.Rb, W2, full.zero_tol)
    Xc = Xc[torch.isfinite(Xc).all(1)]
    ok, qt = full.verify(Xc)
    if not bool(ok.any()):
        return None
    Xn = list(Xc[ok])
    Gn = [full.g_column(x, q) for x, q in zip(Xn, qt[ok])]
    Gs, Xs = torch.stack(Gn, 1), torch.stack(Xn)
    more = _Peeled(list(peeled.X) + Xn, list(peeled.G) + Gn, peeled.RW - Gs @ Xs, peeled.Rb - Gs.sum(1))
    # without them, many rows have a single active sample left: peeling goes on
    return _exact_peel(prob, full, t_start, budget_s, more), len(Xn)


def _with_head_samples(out: _Sampled, more: _Peeled, n_before: int, rest: _Sampled | None) -> _Sampled:
    """The search's record with the head-solved samples (``more`` after ``n_before``) and the rest's search."""
    Xh = torch.stack(more.X[n_before:])
    Gh = torch.stack(more.G[n_before:], 1)
    if rest is None:
        return out._replace(X=Xh, G=Gh, n_sampled=Xh.shape[0], approximate=False, message="")
    return out._replace(
        X=torch.cat([Xh, rest.X]), G=torch.cat([Gh, rest.G], 1), n_sampled=Xh.shape[0] + rest.n_sampled,
        proposals=out.proposals + rest.proposals, approximate=rest.approximate, message=rest.message,
        t_solve=out.t_solve + rest.t_solve, t_filter=out.t_filter + rest.t_filter,
        t_assemble=out.t_assemble + rest.t_assemble, n_dl=out.n_dl + rest.n_dl,
        dl_iterations=out.dl_iterations + rest.dl_iterations, t_dl=out.t_dl + rest.t_dl,
        n_head=out.n_head + rest.n_head)


def _dl_seed(sampler: _Sampler, res: _Residual, lim: _Limits, params: SpearParams, gen: torch.Generator,
             signs: torch.Tensor | None) -> tuple[int, int]:
    """Certified columns from the dictionary-learning search, added to the sampler's pool.

    Returns (columns certified, subgradient steps taken). Off below ``params.dl_min_batch``
    (the sampler is cheap there and B' ≤ 2 needs no search) and when ``dictionary_learning`` is False.
    """
    if not params.dictionary_learning or res.Bp < max(params.dl_min_batch, 3) or res.n_alive < res.Bp:
        return 0, 0
    cfg = DLConfig(iterations=params.dl_iterations, rounds=params.dl_rounds, starts=params.dl_starts,
                   rho=params.dl_rho)
    pats = signs[:, sampler.alive_idx] if signs is not None else None
    found = dl_columns(sampler.Ua, sampler.zero_tol, lim.tau, pats, cfg, gen)
    if found.q.shape[0]:
        sampler._add(found.q, found.zero, found.counts)
    return int(found.q.shape[0]), found.iterations


def _search(sampler: _Sampler, res: _Residual, full: _Full, clean: bool, params: SpearParams, budget: int,
            t_start: float, seeded: bool = False) -> _Search:
    """Sample chunks of proposals and assemble batches from the pool until one is exact or a budget runs out.

    ``seeded``: the pool already holds (dictionary-learning) columns, so a batch is assembled
    before any sampling. Sampling is skipped when B' > ``params.sample_max_batch``: one proposal
    succeeds with probability about B'·2^-(B'-1), so there it only burns its budget.
    """
    Bp = res.Bp
    best: _Batch | None = None
    full_ok = False
    message = ""
    t_assemble = 0.0
    if (Bp <= 2 or seeded) and clean:
        # the last two columns need no sampling (_complete)
        ta = time.perf_counter()
        best = _select(sampler, res, full, clean)
        t_assemble += time.perf_counter() - ta
        full_ok = best is not None and best.n_ok == Bp
    pending = False
    next_assembly = 0  # proposals tried at which the pool is next assembled
    if not full_ok and clean and Bp > max(params.sample_max_batch, 2):
        n = sampler.pool_q.shape[0]
        exact = best.n_ok if best is not None else 0
        return _Search(best, f"{n} of {Bp} residual columns certified, {exact} samples exact; "
                             f"sampling skipped at B' = {Bp} > sample_max_batch", t_assemble)
    while not full_ok and Bp > 1 and res.n_alive >= Bp:
        out_of_time = _out_of_time(t_start, params.time_budget_s)
        out_of_props = sampler.tried >= budget
        if not (out_of_time or out_of_props):
            pending |= sampler.chunk(min(params.chunk_size, budget - sampler.tried)) > 0
        # assemble when the pool changed, at proposal counts only (not seconds): deterministic
        if pending and (out_of_time or out_of_props or sampler.tried >= next_assembly):
            pending = False
            now = time.perf_counter()
            found = _select(sampler, res, full, clean)
            t_assemble += time.perf_counter() - now
            next_assembly = max(int(sampler.tried * _ASSEMBLE_GROWTH), sampler.tried + params.chunk_size)
            if found is not None and (best is None or found.n_ok > best.n_ok):
                best = found
                full_ok = found.n_ok == Bp
        if out_of_time or out_of_props:
            if not full_ok:
                message = "time budget exhausted" if out_of_time else "proposal budget exhausted"
            break
    return _Search(best, message, t_assemble)


def _select(sampler: _Sampler, res: _Residual, full: _Full, clean: bool) -> _Batch | None:
    """A batch from the pool: greedy independent columns, completed, assembled, then improved by swaps."""
    Bp = res.Bp
    order = sampler.ordered()
    sel = _greedy_independent(list(sampler.pool_q), order, Bp)
    if len(sel) < Bp - 2 or not clean:
        return None
    Ghat = _complete([sampler.pool_q[i] for i in sel], res, full)
    if Ghat is None:
        return None
    out = _assemble(Ghat, res.U, res.S, res.Vh, res.Rb)
    if out is None:
        return None
    okv, _ = full.verify(out[0])
    n_ok = int(okv.sum())
    if n_ok == Bp or len(sel) < Bp:
        return _Batch(n_ok, *out)
    return _swap(sampler, res, full, order, sel, okv, _Batch(n_ok, *out))


def _swap(sampler: _Sampler, res: _Residual, full: _Full, order: list[int], sel: list[int], okv: torch.Tensor,
          batch: _Batch) -> _Batch:
    """Replace columns of failing samples by unused pool entries while the exact count improves."""
    unused = [i for i in order if i not in sel]
    tries = 0
    improved = True
    while improved and batch.n_ok < res.Bp and tries < _MAX_SWAPS:
        improved = False
        for pos in torch.nonzero(~okv).flatten().tolist():
            for cand in list(unused):
                tries += 1
                trial = list(sel)
                trial[pos] = cand
                G2 = torch.stack([res.U @ sampler.pool_q[i] for i in trial], 1)
                o2 = _assemble(G2, res.U, res.S, res.Vh, res.Rb)
                if o2 is None:
                    continue
                ok2, _ = full.verify(o2[0])
                if int(ok2.sum()) > batch.n_ok:
                    unused.remove(cand)
                    unused.append(sel[pos])
                    sel, okv, batch = trial, ok2, _Batch(int(ok2.sum()), *o2)
                    improved = True
                    break
                if tries >= _MAX_SWAPS:
                    break
            if improved or tries >= _MAX_SWAPS:
                break
    return batch


def _complete(cols: list[torch.Tensor], res: _Residual, full: _Full) -> torch.Tensor | None:
    """G-column directions (m×B') from B'−2 … B' known columns (basis of ``res.U``), or None."""
    Bp, U2 = res.Bp, res.U
    if len(cols) == Bp - 2 and Bp >= 2:
        for g in _two_missing(cols, U2, res.S, res.Vh, res.Rb, full):
            c = U2.T @ g
            c = c / c.norm().clamp_min(1e-300)
            if all(abs(float(c @ u)) < 1 - 1e-8 for u in cols) and len(cols) < Bp:
                cols = cols + [c]
    if len(cols) == Bp - 1:
        return _last_column(cols, res, full)
    if len(cols) == Bp:
        return torch.stack([U2 @ c for c in cols], 1)
    return None


def _last_column(cols: list[torch.Tensor], res: _Residual, full: _Full) -> torch.Tensor | None:
    """All B' G columns when B'−1 are known: the last sample from the bias gradient, verified exactly."""
    U2, S2, Vh2, Bp = res.U, res.S, res.Vh, res.Bp
    # the last sample's dual row: a_last ⟂ known columns, aᵀ q_last = 1
    if cols:
        a = _nullvec(torch.stack([c / S2 for c in cols], 0))[0]
    else:
        a = torch.ones(Bp, dtype=torch.float64)
    denom = float(a @ ((U2.T @ res.Rb) / S2))
    if abs(denom) < 1e-300:
        return None
    x = Vh2.T @ (a / denom)
    okl, qtl = full.verify(x[None])
    if not bool(okl[0]):
        return None
    return torch.stack([U2 @ c for c in cols] + [full.g_column(x, qtl[0])], 1)


def _fallback_batch(sampler: _Sampler, res: _Residual, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Best approximate batch when no exact one was assembled: greedy columns, completed with orthogonal directions."""
    U2, S2, Vh2, Bp = res.U, res.S, res.Vh, res.Bp
    order = sampler.ordered()
    sel = _greedy_independent(list(sampler.pool_q), order, Bp)
    cols = [sampler.pool_q[i] for i in sel]
    extra = torch.randn(Bp, Bp, dtype=torch.float64, generator=gen)
    for j in range(Bp):
        if len(cols) >= Bp:
            break
        v = extra[:, j].clone()
        for u in cols:
            v = v - (u @ v) / (u @ u) * u
        if float(v.norm()) > 1e-6:
            cols.append(v / v.norm())
    Ghat = torch.stack([U2 @ c for c in cols], 1)
    out = _assemble(Ghat, U2, S2, Vh2, res.Rb, ridge=_APPROX_RIDGE)
    if out is None:
        return Vh2.clone(), U2 * S2[None, :]
    return out


# ---------------------------------------------------------------------------- stage 5: final batch


def _final_batch(prob: _Problem, full: _Full, clean: bool, peeled: _Peeled, sampled: _Sampled | None) -> _Final:
    """Peeled and sampled samples together, verified; reassembled in the full basis when every sample is exact.

    The full basis is the most precise one: the residual basis carries the peeled samples' rounding.
    """
    m, n = prob.dW.shape
    Xs_list = list(peeled.X)
    Gs_list = list(peeled.G)
    if sampled is not None:
        Xs_list += list(sampled.X)
        Gs_list += list(sampled.G.T)
    X = torch.stack(Xs_list) if Xs_list else torch.zeros(0, n, dtype=torch.float64)
    G = torch.stack(Gs_list, 1) if Gs_list else torch.zeros(m, 0, dtype=torch.float64)
    exact = full.verify(X)[0] if clean else torch.zeros(X.shape[0], dtype=torch.bool)
    if clean and X.shape[0] == full.B and bool(exact.all()):
        out = _assemble(G / G.norm(dim=0, keepdim=True).clamp_min(1e-300), full.U, full.S, full.Vh, prob.db)
        if out is not None:
            X2, G2 = out
            ok2, _ = full.verify(X2)
            if bool(ok2.all()):
                X, G, exact = X2, G2, ok2
    return _Final(X, G, exact)


# ---------------------------------------------------------------------------- main entry


def _noisy_batch(prob: _Problem, full: _Full, params: SpearParams, gen: torch.Generator,
                 signs: torch.Tensor | None) -> _Final | None:
    """The approximate batch of a noisy update (``spear-scale.md`` §4): the B sharpest distinct minima of
    the sign-corrected ℓ1 objective in the top-B subspace, scales from the bias gradient, ``X = Q⁻¹ Vh``.

    Measured on 28×28 digits, width 1000, B = 8, noise std 10⁻³: every true column is found to
    |cos| ≥ 0.999 and the batch scores 37–39 dB before the plugin's least-squares refinement
    (the sampled search's approximate batch: 9.5 dB). None when the search finds fewer than B
    distinct directions or the assembly is singular (the caller then falls back to the search).
    """
    if full.B < 2:
        return None
    cfg = DLConfig(iterations=params.dl_iterations, starts=params.dl_starts, rho=params.approx_rho)
    Q = approximate_columns(full.U, signs, cfg, gen, full.B)
    if Q.shape[1] < full.B:
        return None
    out = _assemble(full.U @ Q, full.U, full.S, full.Vh, prob.db)
    if out is None or not bool(torch.isfinite(out[0]).all()):
        return None
    X, G = out
    return _Final(X, G, torch.zeros(X.shape[0], dtype=torch.bool))


def _degenerate_result(B: int, n: int, t_start: float) -> SpearResult:
    """B zero inputs, flagged: a zero or non-finite update carries nothing to recover."""
    X = torch.zeros(B, n, dtype=torch.float64)
    return SpearResult(X, None, torch.zeros(X.shape[0], dtype=torch.bool), X.shape[0], 0,
                       seconds=time.perf_counter() - t_start, approximate=True,
                       message="the weight gradient is zero or not finite")


def spear_recover(
    dW: torch.Tensor,
    db: torch.Tensor,
    W: torch.Tensor,
    b: torch.Tensor,
    batch_size: int | None = None,
    params: SpearParams | None = None,
    *,
    seed: int = 0,
    class_signs: torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor] | None = None,
    inexact: bool = False,
) -> SpearResult:
    """Recover the inputs of a Linear→ReLU layer from its weight and bias gradients.

    :param dW: ``∂L/∂W``, shape ``(m, n)`` (PyTorch ``weight.grad`` layout).
    :param db: ``∂L/∂b``, shape ``(m,)``.
    :param W: the layer's weight ``(m, n)``; :param b: its bias ``(m,)``.
    :param batch_size: B when known; otherwise the numerical rank of ``dW``.
    :param params: a :class:`SpearParams` (``Spear.Params``); defaults when None.
    :param seed: seeds the sampling stage's generator.
    :param class_signs: K×m class sign patterns in {−1, 0, 1} for the dictionary-learning search,
        only for a layer that feeds the logits of a cross-entropy loss directly (see
        :func:`defenda_attacks._spear_dl.dl_columns`); None: plain ℓ1.
    :param head: ``(W₂, b₂)`` of the linear layer that maps this layer's ReLU output to the logits of a
        softmax cross-entropy loss, when it does (the batch is then completed with up to K−3 columns
        missing, :mod:`defenda_attacks._spear_head`); None: no such head.
    :param inexact: the columns of ``G`` are known not to be exactly sparse although ``∂L/∂W``
        has rank B (a FedAvg delta of several local steps on the same samples: each column sums
        the sample's gradients along the local run): go straight to the noisy update's
        approximate batch, as ``spear-scale.md`` §4 ("FedAvg") prescribes.
    :returns: a :class:`SpearResult` with ``inputs`` of shape ``(B̂, n)``.
    """
    p = params or SpearParams()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    gen = torch.Generator().manual_seed(int(seed))
    rt, zt = _precision_tols(dW.dtype)
    rank_tol = p.rank_tol or rt
    zero_tol = p.zero_tol or zt
    prob = _normalise(dW, db, W, b)
    if prob is None:
        return _degenerate_result(batch_size or 1, dW.shape[1], t_start)

    t = time.perf_counter()
    rk = _factorise(prob.dW, batch_size, rank_tol)
    timings["svd"] = time.perf_counter() - t
    full = _layer_problem(prob, rk, zero_tol)

    signs = class_signs.detach().to(torch.float64).cpu() if class_signs is not None else None
    if (inexact or not rk.clean) and p.dictionary_learning:
        t = time.perf_counter()
        noisy = _noisy_batch(prob, full, p, gen, signs)
        timings["dictionary_learning"] = time.perf_counter() - t
        if noisy is not None:
            return SpearResult(
                inputs=noisy.X, grad_z=noisy.G * prob.scale, exact=noisy.exact, batch_size=rk.B, rank=rk.rank,
                seconds=time.perf_counter() - t_start, timings=timings, approximate=True, noisy=True,
                message=(_too_few_inputs(dW, batch_size) or
                         ("several local steps on the same samples: no exactly sparse columns" if rk.clean else
                          "no exact low-rank structure (noisy update)")) + ": approximate batch from the sparsest directions",
                dl_iterations=p.dl_iterations * (signs.shape[0] if signs is not None and signs.numel() else 1),
            )

    t = time.perf_counter()
    peeled = _peel(prob, full, rk.clean, p, t_start)
    timings["peel"] = time.perf_counter() - t

    t = time.perf_counter()
    hd = None if head is None else (head[0].detach().to(torch.float64).cpu(), head[1].detach().to(torch.float64).cpu())
    sampled = _sample(prob, full, rk.clean, peeled, p, gen, t_start, signs, hd) if rk.B > len(peeled.X) else None
    if sampled is not None:
        timings["dictionary_learning"] = sampled.t_dl
        timings["sample_solve"] = sampled.t_solve
        timings["sample_filter"] = sampled.t_filter
    timings["sample"] = time.perf_counter() - t
    timings["assemble"] = sampled.t_assemble if sampled is not None else 0.0

    t = time.perf_counter()
    final = _final_batch(prob, full, rk.clean, peeled, sampled)
    timings["final"] = time.perf_counter() - t
    message = sampled.message if sampled is not None else ""
    if not rk.clean:
        message = message or (_too_few_inputs(dW, batch_size) or "no exact low-rank structure (noisy update)") + ": approximate batch"
    else:
        hint = _limit_hint(batch_size, rk, int(full.alive.sum()), bool(final.exact.all()))
        message = "; ".join(m for m in (message, hint) if m)
    approximate = sampled.approximate if sampled is not None else not rk.clean
    return SpearResult(
        inputs=final.X, grad_z=final.G * prob.scale, exact=final.exact, batch_size=rk.B, rank=rk.rank,
        proposals=sampled.proposals if sampled is not None else 0, seconds=time.perf_counter() - t_start,
        timings=timings, n_peeled=len(peeled.X), n_sampled=sampled.n_sampled if sampled is not None else 0,
        approximate=approximate or not bool(final.exact.all()), message=message, noisy=not rk.clean,
        n_dl_columns=sampled.n_dl if sampled is not None else 0,
        dl_iterations=sampled.dl_iterations if sampled is not None else 0,
        n_head=sampled.n_head if sampled is not None else 0,
    )
