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
"""

from __future__ import annotations

import torch

__all__ = ["head_inputs", "max_missing"]

# relative least-squares residual of the head fit above which a column does not fit W₂ᵀ(π − e_y)
_FIT_TOL = 1e-8


def max_missing(num_classes: int) -> int:
    """The most missing columns the head solves around: K − 1 equations for u + 2 unknowns."""
    return max(num_classes - 3, -1)


def head_inputs(cols: torch.Tensor, U: torch.Tensor, R: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                W2: torch.Tensor, b2: torch.Tensor, zero_tol: float) -> torch.Tensor:
    """Candidate inputs (k×n) of the samples whose columns ``cols`` are known; see the module docstring."""
    k, Bp = cols.shape
    n = R.shape[1]
    out = torch.full((k, n), float("nan"), dtype=torch.float64)
    u = Bp - k
    if k == 0 or u < 0 or u > max_missing(W2.shape[0]):
        return out
    F = cols.T  # B' × k, linearly independent unit columns
    Uf, _, _ = torch.linalg.svd(F, full_matrices=True)
    NF = Uf[:, k:]  # B' × u: orthogonal to every found column
    dual = torch.linalg.pinv(F)  # k × B': row i is orthogonal to the other found columns
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
    e = torch.linalg.lstsq(H, g[A, None]).solution.flatten()
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
    sol = torch.linalg.lstsq(lhs, rhs[:, None]).solution.flatten()
    if not bool(torch.isfinite(sol).all()):
        return None
    return sol[:-1]
