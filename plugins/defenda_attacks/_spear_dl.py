"""SPEAR's dictionary-learning search: the columns of ``G`` as the sparsest directions of a subspace.

SPEAR (Dimitrov, Baader, Müller, Vechev, NeurIPS 2024) finds the columns of ``Q`` in
``G = L Q`` by sampling (B−1)-row submatrices of ``L``, whose success chance per proposal falls
exponentially with B. SPEAR++ (Bakarsky, Dimitrov, Baader, Vechev, arXiv 2510.24200) recasts
the same search as sparsely-used dictionary learning. This module is our own implementation of
that formulation (their code is not public), following ``shared/reference/spear-scale.md`` §3:

* ``L`` (alive rows, orthonormal columns) spans the columns of ``G``; a column ``g_i = L q_i``
  is zero on the ~m/2 neurons sample i does not activate, so ``q_i`` is a sharp local minimum of
  ``‖L q‖₁`` on the unit sphere once the layer is wide (m ≳ 16·B) — robust hyperplane fitting
  (DPCP) seen from the rows of ``L``.
* Each search starts at a row of ``L`` (a neuron few samples activate starts next to their
  hyperplanes: the smooth generalisation of peeling) or at a random direction, and takes
  Riemannian subgradient steps with geometrically decaying step size (the DPCP method of
  Zhu, Ding, Robinson, Tsakiris, Vidal, NeurIPS 2019), in float32 because exactness comes later.
* When the layer feeds the logits of a cross-entropy loss directly, same-class columns are
  ~0.5 correlated (``g_i ∝ mask_i ⊙ W₂ᵀ(p_i − e_y)``) and plain ℓ1 converges to mixtures; a
  per-class sign pattern ``s^y = sign(W₂ᵀ(p̄ − e_y))`` then penalises entries of the wrong sign
  by ``rho`` (the class-sign correction), and every start is searched once per class.
* Iterates are rounded exactly in float64 by inverse iteration on the rows where ``|L q|`` is
  smallest (the null vector of those rows), and a rounded direction is kept only when it is
  *certified*: at least ``tau`` exact zeros and a zero set whose rows leave exactly one null
  direction (nullity one, identifiability condition I2). Mixtures of two columns leave two.

The caller still assembles the batch and runs the ReLU-consistency test on every sample: a
certified column is necessary, not sufficient, for an exact sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from defenda_attacks._linalg import solve_spd

__all__ = ["DLColumns", "DLConfig", "approximate_columns", "class_sign_patterns", "dl_columns"]

# Iterates closer than this (|cos|) are one basin: merged at every pruning step.
_MERGE_COS = 0.999
# Certified columns closer than this (|cos|) are the same column of Q.
_SAME_COS = 1 - 1e-8
# Rounded columns solved together (memory: chunk × rows × B' doubles).
_ROUND_CHUNK = 256
# Candidates certified together (memory: chunk × rows × B' doubles).
_CERT_CHUNK = 32
# Largest null space of a candidate's zero set that is split into columns, and the proposals
# (r−1-row subsets) tried per split when r > 2.
_MAX_SPLIT = 1  # splitting is off: see _split (it certified false columns on photo crops)
_SPLIT_PROPOSALS = 512


@dataclass(frozen=True)
class DLConfig:
    """The work budget and constants of the search (all counted in iterations, never seconds)."""

    iterations: int = 150  # subgradient steps per round
    rounds: int = 3  # rounds with fresh starting points while columns are missing
    starts: int = 0  # starting directions per round (0: 2·B' + 32, at most the alive rows)
    mu0: float = 0.2  # first step (radians, roughly)
    beta: float = 0.97  # geometric step decay
    rho: float = 10.0  # penalty on entries of the wrong class sign
    prune_every: int = 25  # iterations between merges of iterates in one basin
    float32: bool = True  # float32 search (the rounding is float64 either way)


class DLColumns(NamedTuple):
    """Certified columns: unit ``q`` (k×B', basis of ``L``), zero sets on the alive rows, zero counts."""

    q: torch.Tensor
    zero: torch.Tensor
    counts: torch.Tensor
    iterations: int  # subgradient steps taken, summed over rounds (the work done)
    directions: int  # starting directions searched, summed over rounds and classes


def dl_columns(L: torch.Tensor, zero_tol: float, tau: int, signs: torch.Tensor | None, cfg: DLConfig,
               gen: torch.Generator, want: int | None = None) -> DLColumns:
    """Certified columns of ``G = L Q`` from ``L`` (alive rows × B', orthonormal columns).

    :param zero_tol: an entry ``(L q)_j`` is zero when ``≤ zero_tol·‖L_j‖``.
    :param tau: zero count a certified column must reach.
    :param signs: K×(alive rows) class sign patterns in {−1, 0, 1}, or None (plain ℓ1).
    :param want: stop once this many columns are certified (default B').
    """
    Bp = L.shape[1]
    want = Bp if want is None else want
    rown = L.norm(dim=1).clamp_min(1e-300)
    found = DLColumns(torch.zeros(0, Bp, dtype=torch.float64), torch.zeros(0, L.shape[0], dtype=torch.bool),
                      torch.zeros(0, dtype=torch.long), 0, 0)
    if Bp < 2 or L.shape[0] < Bp:
        return found
    pats = signs if signs is not None and signs.numel() else torch.zeros(1, L.shape[0], dtype=torch.float64)
    for r in range(cfg.rounds):
        Q0 = _starts(L, found.q, cfg.starts or 2 * Bp + 32, r, gen)
        cands = [_descend(L, Q0, pats[k], cfg) for k in range(pats.shape[0])]
        Q = _round(L, torch.cat(cands, 1).double())
        q, zero, cnt = _certify(L, Q, rown, zero_tol, tau)
        found = _merge(found, q, zero, cnt, cfg.iterations * pats.shape[0], Q0.shape[1] * pats.shape[0])
        if found.q.shape[0] >= want:
            break
    return found


def approximate_columns(L: torch.Tensor, signs: torch.Tensor | None, cfg: DLConfig, gen: torch.Generator,
                        k: int, max_cos: float = 0.95) -> torch.Tensor:
    """``k`` unit directions (B'×k) of the sharpest minima of the (sign-corrected) ℓ1 objective, for a noisy ``L``.

    Noise leaves no exact zeros to round or certify (``spear-scale.md`` §4): the subgradient
    iterates are kept as they are, ranked by their objective (the smallest over the class
    patterns and the sign of ``q``) and taken greedily, skipping any within ``max_cos`` of one
    already taken. Ranking by the sign-corrected objective matters on correlated data: plain ℓ1
    also has minima sparser than the true columns. Fewer than ``k`` when the search finds fewer.
    """
    Bp = L.shape[1]
    pats = signs if signs is not None and signs.numel() else torch.zeros(1, L.shape[0], dtype=torch.float64)
    Q0 = _starts(L, torch.zeros(0, Bp, dtype=torch.float64), cfg.starts or 2 * Bp + 32, 0, gen)
    Q = torch.cat([_descend(L, Q0, pats[c], cfg).double() for c in range(pats.shape[0])], 1)
    Q = Q / Q.norm(dim=0, keepdim=True).clamp_min(1e-300)
    V = L @ Q
    objective = torch.stack([torch.minimum(_objective(V, pats[c], cfg.rho), _objective(-V, pats[c], cfg.rho))
                             for c in range(pats.shape[0])]).min(0).values
    chosen: list[int] = []
    for i in torch.argsort(objective).tolist():
        if all(abs(float(Q[:, i] @ Q[:, j])) < max_cos for j in chosen):
            chosen.append(i)
            if len(chosen) == k:
                break
    return Q[:, chosen]


def _objective(V: torch.Tensor, s: torch.Tensor, rho: float) -> torch.Tensor:
    """Per column of ``V = L Q``, :func:`_descend`'s objective: |v| where s = 0, s·v where signs agree, −rho·s·v not."""
    s = s.to(V.dtype)[:, None]
    return torch.where(s == 0, V.abs(), torch.where(s * V >= 0, s * V, -rho * s * V)).sum(0)


def _starts(L: torch.Tensor, known: torch.Tensor, C: int, round_: int, gen: torch.Generator) -> torch.Tensor:
    """B'×C unit starting directions: rows of ``L`` (first round) and random ones, away from known columns.

    Rows of ``L`` of neurons few samples activate lie next to those samples' columns, so the
    first round starts from rows (the sparsest-looking neurons first, by their row norm spread);
    later rounds use random directions with the known columns projected out, so the search
    does not fall back into basins already found.
    """
    m, Bp = L.shape
    n_rows = min(m, C) if round_ == 0 else 0
    parts = []
    if n_rows:
        # deterministic: an evenly spaced subset of rows (every row when C ≥ m)
        idx = torch.linspace(0, m - 1, n_rows).round().long().unique()
        parts.append(L[idx].T)
    n_rand = C - (parts[0].shape[1] if parts else 0) + (Bp // 2 if round_ == 0 else 0)
    if n_rand > 0:
        R = torch.randn(Bp, n_rand, dtype=torch.float64, generator=gen)
        if known.shape[0] and known.shape[0] < Bp:
            Qk, _ = torch.linalg.qr(known.T)
            R = R - Qk @ (Qk.T @ R)
        parts.append(R)
    Q0 = torch.cat(parts, 1)
    return Q0 / Q0.norm(dim=0, keepdim=True).clamp_min(1e-300)


def _descend(L: torch.Tensor, Q0: torch.Tensor, s: torch.Tensor, cfg: DLConfig) -> torch.Tensor:
    """Riemannian subgradient descent of the (sign-corrected) ℓ1 objective from the columns of ``Q0``.

    Objective per column: Σ_j φ(s_j, (Lq)_j) with φ = |t| where s_j = 0, s_j·t where the sign
    agrees and −rho·s_j·t where it does not. Each start's sign is chosen so its image agrees with
    ``s`` (q and −q are the same column). Every ``prune_every`` steps iterates in one basin merge.
    """
    dt = torch.float32 if cfg.float32 else torch.float64
    Lt = L.to(dt)
    s = s.to(dt)[:, None]
    Q = Q0.to(dt).clone()
    plain = not bool((s != 0).any())
    if not plain:
        flip = torch.sign((s * (Lt @ Q)).sum(0))
        Q = Q * torch.where(flip == 0, torch.ones_like(flip), flip)[None, :]
    mu = cfg.mu0
    for t in range(cfg.iterations):
        V = Lt @ Q
        if plain:
            sub = torch.sign(V)
        else:
            sub = torch.where(s == 0, torch.sign(V), torch.where(s * V >= 0, s, -cfg.rho * s))
        g = Lt.T @ sub
        g -= Q * (Q * g).sum(0, keepdim=True)  # tangent to the sphere at each q
        Q -= mu * g / g.norm(dim=0, keepdim=True).clamp_min(1e-30)
        Q /= Q.norm(dim=0, keepdim=True).clamp_min(1e-30)
        mu *= cfg.beta
        if cfg.prune_every and (t + 1) % cfg.prune_every == 0 and t + 1 < cfg.iterations:
            Q = Q[:, _distinct(Q, _MERGE_COS)]
    return Q


def _distinct(Q: torch.Tensor, cos: float) -> torch.Tensor:
    """Indices of the columns of ``Q`` (unit) that no earlier column matches to |cos| > ``cos``."""
    if Q.shape[1] <= 1:
        return torch.arange(Q.shape[1])
    same = (Q.T @ Q).abs() > cos
    first = same.to(torch.int8).argmax(dim=1)
    return torch.unique(first)


def _round(L: torch.Tensor, Q: torch.Tensor, sweeps: int = 2) -> torch.Tensor:
    """Float64 null-space rounding: inverse iteration on the B'+16 rows where ``|L q|`` is smallest.

    An iterate within ~10⁻³ rad of a column has its ~m/2 zeros among its smallest entries; the
    null vector of (any B'+16 of) those rows is the column to float64 precision, and
    ``(L_Zᵀ L_Z + εI)⁻¹ q`` amplifies exactly that direction. A solve, not an inverse.
    """
    m, Bp = L.shape
    k = min(m, Bp + 16)
    Q = Q[:, _distinct(Q / Q.norm(dim=0, keepdim=True).clamp_min(1e-300), _MERGE_COS)]
    eps = 1e-10 * float(L.pow(2).sum())
    eye = torch.eye(Bp, dtype=torch.float64)
    out = []
    for c0 in range(0, Q.shape[1], _ROUND_CHUNK):
        q = Q[:, c0 : c0 + _ROUND_CHUNK].T.clone()  # C × B'
        for _ in range(sweeps):
            idx = torch.topk((q @ L.T).abs(), k, dim=1, largest=False).indices  # C × k
            Lz = L[idx]  # C × k × B'
            gram = Lz.transpose(1, 2) @ Lz + eps * eye
            q = solve_spd(gram, q.unsqueeze(-1)).squeeze(-1)
            q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
        out.append(q)
    return torch.cat(out, 0) if out else torch.zeros(0, Bp, dtype=torch.float64)


def _certify(L: torch.Tensor, Q: torch.Tensor, rown: torch.Tensor, zero_tol: float, tau: int, split: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rounded directions (rows of ``Q``) that are exact columns: ≥ ``tau`` exact zeros, nullity one.

    Nullity one: on its zero set the rows of ``L`` span B'−1 dimensions (the second-smallest
    eigenvalue of their Gram matrix is far from 0). A mixture of two columns is zero where both
    are and leaves a two-dimensional null space there: such small null spaces are split into
    their columns (:func:`_split`) and those certified in turn.
    """
    Bp = L.shape[1]
    empty = (torch.zeros(0, Bp, dtype=torch.float64), torch.zeros(0, L.shape[0], dtype=torch.bool),
             torch.zeros(0, dtype=torch.long))
    if Q.shape[0] == 0:
        return empty
    zero = (Q @ L.T).abs() <= zero_tol * rown[None, :]
    cnt = zero.sum(1)
    keep = torch.nonzero(cnt >= max(tau, Bp - 1)).flatten()
    # one candidate per zero set: iterates of one basin round to the same set
    if keep.numel():
        _, inv = torch.unique(zero[keep], dim=0, return_inverse=True)
        first = torch.full((int(inv.max()) + 1,), keep.numel(), dtype=torch.long).scatter_reduce(
            0, inv, torch.arange(keep.numel()), reduce="amin")
        keep = keep[first]
    good, parts = [], []
    for c0 in range(0, keep.numel(), _CERT_CHUNK):
        ids = keep[c0 : c0 + _CERT_CHUNK]
        Lz = zero[ids].to(torch.float64)[:, :, None] * L[None]  # c × m × B', rows off the zero set blanked
        lam, vec = torch.linalg.eigh(Lz.transpose(1, 2) @ Lz)
        rel = lam / lam[:, -1:].clamp_min(1e-300)
        # eigenvalues are accurate to ~1e-16 of the largest: exact null directions sit below 1e-12
        nullity = (rel <= 1e-12).sum(1)
        good.append(ids[nullity == 1])
        if not split:
            continue
        for j in torch.nonzero((nullity >= 2) & (nullity <= _MAX_SPLIT)).flatten().tolist():
            parts.append(_split(L, vec[j, :, : int(nullity[j])], rown, zero_tol))
    sel = torch.cat(good) if good else torch.zeros(0, dtype=torch.long)
    q, z, c = Q[sel], zero[sel], cnt[sel]
    if parts:
        qs = torch.cat(parts)
        if qs.shape[0]:
            q2, z2, c2 = _certify(L, qs, rown, zero_tol, tau, split=False)
            q, z, c = torch.cat([q, q2]), torch.cat([z, z2]), torch.cat([c, c2])
    return q, z, c


def _split(L: torch.Tensor, N: torch.Tensor, rown: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Columns of ``G`` inside an r-dimensional null space ``N`` (B'×r, 2 ≤ r ≤ ``_MAX_SPLIT``).

    Correlated samples (photos) share most inactive neurons, so an iterate can settle on a
    mixture of two columns whose common zero set alone passes the sparsity threshold. A true
    column in span(N) is zero on further rows of ``M = L N``: SPEAR's own search in r dimensions
    instead of B' finds it — the null vector of r−1 rows, over every single row for r = 2,
    a fixed seeded sample of subsets beyond. Generic rows are in general position, so a
    direction zero on r + 2 or more further rows is not an accident; it is kept.

    Disabled (``_MAX_SPLIT = 1``): on 32×32 photo crops, B' = 64, m = 2000 the split directions
    passed the nullity-one test at the 1e-8 zero tolerance although 4266 of 4312 were not
    columns (checked against the true G); certification must come first. Kept for that work.
    """
    r = N.shape[1]
    M = L @ N  # m × r; zero on the common zero set
    live = torch.nonzero(M.norm(dim=1) > zero_tol * rown).flatten()
    if live.numel() < r - 1:
        return torch.zeros(0, L.shape[1], dtype=torch.float64)
    Ml = M[live]
    if r == 2:
        rows = torch.arange(live.numel())[:, None]
    else:
        gen = torch.Generator().manual_seed(r)
        rows = torch.randint(live.numel(), (_SPLIT_PROPOSALS, r - 1), generator=gen)
    V = torch.linalg.svd(Ml[rows], full_matrices=True).Vh[:, -1, :]  # P × r: null vector of each row subset
    extra = ((Ml @ V.T).abs() <= zero_tol * rown[live, None]).sum(0)
    V = V[extra >= r + 2]
    if V.shape[0] == 0:
        return torch.zeros(0, L.shape[1], dtype=torch.float64)
    q = V @ N.T
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    return q[_distinct(q.T, _SAME_COS)]


def _merge(found: DLColumns, q: torch.Tensor, zero: torch.Tensor, cnt: torch.Tensor, iters: int, dirs: int
           ) -> DLColumns:
    """``found`` plus the new certified columns not already in it (|cos| > 1 − 1e-8 is the same)."""
    allq = torch.cat([found.q, q])
    allz = torch.cat([found.zero, zero])
    allc = torch.cat([found.counts, cnt])
    if allq.shape[0]:
        keep = _distinct(allq.T, _SAME_COS)
        allq, allz, allc = allq[keep], allz[keep], allc[keep]
    return DLColumns(allq, allz, allc, found.iterations + iters, found.directions + dirs)


def class_sign_patterns(head_weight: torch.Tensor, p_bar: torch.Tensor, drop: float = 0.3) -> torch.Tensor:
    """K×m sign patterns ``s^y = sign(W₂ᵀ(p̄ − e_y))`` for a layer feeding the logits ``W₂ h + b₂``.

    At initialisation every sample's softmax is close to the public mean ``p̄``, so a sample of
    class y has ``∂L/∂z ∝ mask ⊙ W₂ᵀ(p̄ − e_y)`` up to a positive factor. The ``drop`` share of
    neurons with the smallest ``|u^y|`` get sign 0 (plain ℓ1 there): their sign is unreliable.
    """
    W2 = head_weight.detach().to(torch.float64).cpu()
    K = W2.shape[0]
    P = p_bar.detach().to(torch.float64).cpu().reshape(1, K) - torch.eye(K, dtype=torch.float64)
    u = P @ W2  # K × m
    s = torch.sign(u)
    n_drop = int(drop * u.shape[1])
    if n_drop:
        idx = torch.topk(u.abs(), n_drop, dim=1, largest=False).indices
        s.scatter_(1, idx, 0.0)
    return s
