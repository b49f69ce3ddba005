"""Inputs of samples whose column of ``G`` is known, from the classifier head, while columns are still missing.

SPEAR assembles ``X = Q⁻¹ R`` (``∂L/∂W = U R``, ``G = U Q``): the input of sample i is
``x_i = Rᵀ p_i`` with ``p_i`` the i-th row of ``Q⁻¹``, which is orthogonal to every *other*
column of ``Q``. With k of B' columns certified, the rows ``p_i`` of the found samples are
known only up to an (u+1)-dimensional space, u = B' − k, so the bias gradient alone completes
a batch only when u ≤ 2 (``_two_missing``).

When the attacked layer feeds the logits of a K-class softmax cross-entropy directly
(``o = W₂ ReLU(z) + b₂``), a found column says more. Its support is the sample's active set A
and its values are ``∝ W₂ᵀ(π_i − e_y)`` there, so a least-squares fit on A gives
``ê ∝ π_i − e_y``: the label (the one entry of the other sign) and every probability ratio
``π_c / π_c' = ê_c / ê_c'`` for c, c' ≠ y. The logits are affine in ``x_i`` once A is known
(``o = W₂[:, A] (W[A] x + b[A]) + b₂``), so for ``x_i = Rᵀ N c`` (N a basis of the allowed
rows) the K − 1 equations

    o_c(c) − o_y(c) = log ê_c + β          (c ≠ y; β = log s − log(1 + s ê_y) for the unknown scale s)

are *linear* in (c, β): u + 2 unknowns, K − 1 equations. Hence every found sample's input is
determined when u ≤ K − 3 (7 missing columns for 10 classes, against 2 from the bias gradient).
Each candidate is then certified exactly by the caller (ReLU consistency on the whole layer);
nothing here is trusted without it. This is our own derivation on top of SPEAR (Dimitrov,
Baader, Müller, Vechev, NeurIPS 2024), which uses the head only for labels.

Shapes: ``cols`` k×B' (unit columns of Q in the basis ``U`` m×B'), ``R`` B'×n, ``W`` m×n,
``b`` (m,), ``W2`` K×m, ``b2`` (K,). Returns k×n candidates (NaN rows where a sample does not fit
the head's structure: a layer that does not feed a softmax head, a label that is not unique).

With more than K − 3 columns missing, :func:`shared_state_inputs` solves the same found samples
when the missing ones share their states (all inactive, or all active) on many neurons: a cluster
of similar inputs, the case the ℓ1 search cannot separate.
"""

from __future__ import annotations

import torch

from defenda_attacks._linalg import lstsq

__all__ = ["head_inputs", "max_missing", "shared_state_inputs"]

# relative least-squares residual of the head fit above which a column does not fit W₂ᵀ(π − e_y)
_FIT_TOL = 1e-8


def max_missing(num_classes: int) -> int:
    """The most missing columns the head solves around: K − 1 equations for u + 2 unknowns."""
    return max(num_classes - 3, -1)


def _found_bases(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``F`` (B'×k, the found columns), ``N`` (B'×u, an orthonormal basis orthogonal to all of them)
    and ``pinv(F)`` (k×B': row i orthogonal to the other found columns)."""
    F = cols.T
    Uf, _, _ = torch.linalg.svd(F, full_matrices=True)
    return F, Uf[:, F.shape[1]:], torch.linalg.pinv(F)


def head_inputs(cols: torch.Tensor, U: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                W2: torch.Tensor, b2: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Candidate inputs (k×n) of the samples whose columns ``cols`` are known; see the module docstring."""
    k, Bp = cols.shape
    n = R.shape[1]
    out = torch.full((k, n), float("nan"), dtype=torch.float64)
    u = Bp - k
    if k == 0 or u < 0 or u > max_missing(W2.shape[0]):
        return out
    F, NF, dual = _found_bases(cols)
    RN = R.T @ NF  # n × u
    Rd = R.T @ dual.T  # n × k
    WRN, WRd = W @ RN, W @ Rd
    rown = U.norm(dim=1).clamp_min(1e-300)
    G = U @ F  # m × k, the found columns' directions
    for i in range(k):
        x = _one_input(G[:, i], rown, zero_tol, torch.cat([WRN, WRd[:, i : i + 1]], 1), W2, b, b2)
        if x is not None:
            out[i] = torch.cat([RN, Rd[:, i : i + 1]], 1) @ x
    return out


def _one_input(g: torch.Tensor, rown: torch.Tensor, zero_tol: float, WN: torch.Tensor, W2: torch.Tensor,
               b: torch.Tensor, b2: torch.Tensor) -> torch.Tensor | None:
    """Coefficients of one sample's input in the allowed basis (``WN`` = W·Rᵀ·N, m×(u+1)), or None."""
    A = g.abs() > zero_tol * rown  # the sample's active neurons
    if int(A.sum()) < W2.shape[0]:
        return None
    H = W2[:, A].T  # |A| × K
    e = lstsq(H, g[A, None]).flatten()
    if float((H @ e - g[A]).norm()) > _FIT_TOL * float(g[A].norm()):
        return None  # the column is not mask ⊙ W₂ᵀ(π − e_y): no softmax head right after the layer
    neg = e < 0
    if int(neg.sum()) == e.numel() - 1:  # q and −q are the same column: orient so that π_c = s·ê_c > 0
        e, neg = -e, ~neg
    if int(neg.sum()) != 1:
        return None
    y = int(torch.nonzero(neg).flatten()[0])
    rest = torch.nonzero(~neg).flatten()
    M = W2[:, A] @ WN[A]  # K × (u+1): logits' linear part in the coefficients
    o0 = W2[:, A] @ b[A] + b2
    lhs = torch.cat([M[rest] - M[y], -torch.ones(rest.numel(), 1, dtype=M.dtype)], 1)
    rhs = torch.log(e[rest]) - (o0[rest] - o0[y])
    if lhs.shape[0] < lhs.shape[1]:
        return None
    sol = lstsq(lhs, rhs[:, None]).flatten()
    if not bool(torch.isfinite(sol).all()):
        return None
    return sol[:-1]


def shared_state_inputs(cols: torch.Tensor, U: torch.Tensor, R: torch.Tensor, ub: torch.Tensor, W2: torch.Tensor,
                        zero_tol: float, max_inits: int = 16, keep: float = 0.6, iterations: int = 30) -> torch.Tensor:
    """Candidate inputs (k×n) of the found samples when more than K − 3 columns are missing, from the
    rows on which every missing sample is in the same state.

    Write the dual rows of the found samples as ``p_i = dual_i + N c_i`` (N ⟂ the found columns, u
    columns). A row r of U expands as ``U_r = Σ_found (U_r f_i) p_i + Σ_missing (U_r q_j) p_j``, so
    on a row that every missing sample leaves inactive ``U_r N = (U_r F) C`` (C k×u, the rows c_i),
    and on one that every missing sample activates ``U_r q_j = w2_rᵀ v_j`` adds ``w2_rᵀ Y`` (Y K×u)
    to it: a linear regression with k + K features, exact on those rows, whose solution is every
    found sample's dual row. Which rows they are is unknown: the states alternate with trimmed least
    squares (the ``keep`` share of best-fitting rows), started from each found sample's mask in turn
    (missing samples of natural images resemble found ones: on a B = 64 photo batch, run on its true
    columns, 16 of 50 starts converged). It applies where the missing samples share their states on many rows (a cluster
    of similar inputs, e.g. flat image crops: the case where ℓ1 fails, because 14 such columns equal
    ``W₂ᵀ v`` on their common active rows with v in a 9-dimensional space, so combinations of them
    vanish there and are sparser than any true column). ``ub`` = Uᵀ ∂L/∂b (the scale of each sample).
    Returns NaN rows where no start converged to an exact fit; the caller verifies every candidate.
    """
    k, Bp = cols.shape
    n = R.shape[1]
    out = torch.full((k, n), float("nan"), dtype=torch.float64)
    K = W2.shape[0]
    rows = U.norm(dim=1) > 0
    Ua, W2t = U[rows], W2[:, rows].T
    if k == 0 or k >= Bp or Ua.shape[0] < 2 * (k + K):
        return out
    F, N, dual = _found_bases(cols)
    Xf, Yn = Ua @ F, Ua @ N
    masks = Xf.abs() > zero_tol * Ua.norm(dim=1, keepdim=True)  # the found samples' active sets
    tol = 1e-9 * float(Yn.norm(dim=1).max())
    for f in range(min(k, max_inits)):
        C = _shared_state_fit(Xf, Yn, W2t, masks[:, f], keep, iterations, tol)
        if C is not None:
            P = dual + C @ N.T  # k × B': the found samples' dual rows
            s = P @ ub
            return (P @ R) / s[:, None]
    return out


def _shared_state_fit(Xf: torch.Tensor, Yn: torch.Tensor, W2t: torch.Tensor, active: torch.Tensor, keep: float,
                      iterations: int, tol: float) -> torch.Tensor | None:
    """C (k×u) from the alternating fit started at the state guess ``active``, or None unless exact on enough rows."""
    k, K = Xf.shape[1], W2t.shape[1]
    kept = torch.ones_like(active)
    for _ in range(iterations):
        A = lstsq(torch.cat([Xf, W2t * active[:, None]], 1)[kept], Yn[kept])
        base = Yn - Xf @ A[:k]
        r0, r1 = base.norm(dim=1), (base - W2t @ A[k:]).norm(dim=1)
        rmin = torch.minimum(r0, r1)
        new_active, new_kept = r1 < r0, rmin <= torch.quantile(rmin, keep)
        if bool((new_active == active).all()) and bool((new_kept == kept).all()):
            break
        active, kept = new_active, new_kept
    # the regression has k + K unknowns per column: exact on twice as many rows is no coincidence
    return A[:k] if int((rmin < tol).sum()) >= 2 * (k + K) else None
