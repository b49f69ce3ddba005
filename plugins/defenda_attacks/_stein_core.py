"""Core math of the Stein / Hermite-tensor attack (Wang, Lee, Lei, AISTATS 2023), as plain tensor functions.

Nothing here knows about plugins: every function takes tensors and returns
tensors (or small numpy arrays for the ``B``-dimensional decomposition), so the
pieces can be tested and timed on their own.

Notation (shapes):

* ``m`` hidden width, ``d`` input dimension, ``B`` batch size, ``C`` classes,
  ``K`` observation rows (the principal rows of the second-layer gradient,
  ``K ≤ min(B, C-1)`` for cross-entropy), ``p`` tensor order (3 or 4).
* ``W`` (m, d) first-layer weights chosen by the attacker, rows ``N(0, I/ρ̄²)``;
  ``U = ρ̄ W V`` (m, B) the standard-normal weights projected on the span ``V`` (d, B).
* ``Y`` (K, m) observations: rows of ``∇_A L`` (the gradient of the second-layer
  weights), ``Y_kj = Σ_i R_ki σ(w_jᵀ x_i)`` exactly (``R`` the per-sample
  residuals, constant in ``j``).
* Stein identity: ``E_u[Y_k(u) He_p(u)] = Σ_i R_ki μ_p(s_i) ẑ_i^{⊗p}`` where
  ``ẑ_i = Vᵀx_i/‖x_i‖``, ``s_i = ‖x_i‖/ρ̄`` and ``μ_p(s) = E_z[σ(s z) He_p(z)]``.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from defenda_attacks._linalg import estimate_rank, lstsq

Act = Callable[[torch.Tensor], torch.Tensor]

#: activations the attack can model: name -> elementwise torch function
ACTIVATIONS: dict[str, Act] = {
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.01),
    "gelu": F.gelu,
    "silu": F.silu,
    "softplus": F.softplus,
    "elu": F.elu,
}

#: positively homogeneous activations: σ(ρz) = ρσ(z) for ρ > 0, so the norm of x is
#: not identifiable from σ-values alone (only the product r_i ρ_i is)
HOMOGENEOUS = frozenset({"relu", "leaky_relu"})

#: odd (σ(-z) = -σ(z)): ``(x_i, r_i) → (-x_i, -r_i)`` leaves ∇_A unchanged, so the sign of x is
#: not identifiable from σ-values (sigmoid = 1/2 + tanh(z/2)/2 is not: the constant breaks the tie)
ODD = frozenset({"tanh"})


def act_fn(name: str) -> Act:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def act_and_grad(name: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``σ(z)`` and ``σ'(z)`` elementwise (closed forms where cheap, autograd otherwise)."""
    if name == "tanh":
        t = torch.tanh(z)
        return t, 1 - t * t
    if name == "sigmoid":
        s = torch.sigmoid(z)
        return s, s * (1 - s)
    if name == "relu":
        return torch.relu(z), (z > 0).to(z.dtype)
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        y = act_fn(name)(zz)
        (dy,) = torch.autograd.grad(y.sum(), zz)
    return y.detach(), dy


# --------------------------------------------------------------------------- Hermite coefficients


@functools.lru_cache(maxsize=64)
def hermite_coefficients(name: str, gain: float = 1.0, orders: tuple[int, ...] = (1, 2, 3, 4)) -> dict[int, float]:
    """``μ_p = E_{z~N(0,1)}[σ(gain·z) He_p(z)]`` on a fine grid (trapezoid rule on [-12, 12],
    accurate to ~1e-7 also at kinks).

    Equals ``gain^p E[σ^{(p)}(gain·z)]``; ReLU-like activations have ``μ_3 = 0``,
    odd ones ``μ_2 = μ_4 = 0``.
    """
    z = np.linspace(-12.0, 12.0, 48001)
    w = np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi) * (z[1] - z[0])
    sig = act_fn(name)(torch.as_tensor(gain * z, dtype=torch.float64)).numpy()
    out = {}
    for p in orders:
        coef = np.zeros(p + 1)
        coef[p] = 1.0
        he = np.polynomial.hermite_e.hermeval(z, coef)
        out[p] = float(np.sum(w * sig * he))
    return out


def auto_order(name: str, gain: float = 1.0) -> int:
    """Tensor order from the activation: 3 when ``μ_3`` carries signal (tanh, sigmoid, ELU), else 4 (ReLU-like)."""
    mu = hermite_coefficients(name, gain)
    return 3 if abs(mu[3]) >= 0.5 * abs(mu[4]) and abs(mu[3]) > 1e-2 else 4


# --------------------------------------------------------------------------- span and rows


def _gram(M: torch.Tensor, chunk: int = 20000) -> torch.Tensor:
    """``Mᵀ M`` in float64, streaming the rows of ``M``."""
    d = M.shape[1]
    G = torch.zeros(d, d, dtype=torch.float64, device=M.device)
    for s in range(0, M.shape[0], chunk):
        blk = M[s : s + chunk].to(torch.float64)
        G += blk.T @ blk
    return G


def _row_space(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right singular vectors (d, r) and singular values of ``G`` (n, d), via the smaller Gram matrix."""
    n, d = G.shape
    if n >= d:
        evals, evecs = torch.linalg.eigh(G.T @ G)
        evals, evecs = evals.flip(0), evecs.flip(1)
        return evecs, evals.clamp_min(0).sqrt()
    evals, evecs = torch.linalg.eigh(G @ G.T)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    V = G.T @ evecs / s.clamp_min(s[0] * 1e-300 if float(s[0]) > 0 else 1e-300)[None]
    return V, s


def span_from_weight_gradient(
    grad_w: torch.Tensor, rank: int | None = None, rtol: float = 1e-4, rows: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Span of the batch from the first-layer weight gradient (exact).

    Every row of ``∇_W L`` (m, d) lies in ``span{x_i}``, so ``rows`` of them (the weights
    are i.i.d., the first ones are a random subset) already give the span exactly when the
    update is clean; a noisy update (no drop in the spectrum) uses all rows.

    :returns: ``V`` (d, B) orthonormal and the singular values of the rows used.
    """
    m, d = grad_w.shape
    G = grad_w[: min(m, rows)].to(torch.float64)
    V, s = _row_space(G)
    full = len(s)
    k = estimate_rank(s, rtol)
    if (k >= full or k > G.shape[0] // 2) and m > G.shape[0] and d <= 2048:
        evals, evecs = torch.linalg.eigh(_gram(grad_w))
        V, s = evecs.flip(1), evals.flip(0).clamp_min(0).sqrt()
        k = estimate_rank(s, rtol)
    k = rank if rank is not None else k
    V = V[:, :k]
    if V.shape[1] and G.shape[0] < d:  # re-orthonormalise (V = Gᵀ U / s loses orthogonality at tiny s)
        V = torch.linalg.qr(V).Q
    return V.contiguous(), s


def frobenius(W: torch.Tensor, chunk: int = 20000) -> float:
    """``‖W‖_F`` in float64, streaming the rows."""
    return math.sqrt(sum(float((W[s : s + chunk].to(torch.float64) ** 2).sum()) for s in range(0, W.shape[0], chunk)))


def project(W: torch.Tensor, V: torch.Tensor, chunk: int = 20000) -> torch.Tensor:
    """``W V`` (m, k) in float64, converting ``W`` chunk by chunk (no float64 copy of W)."""
    return torch.cat([W[s : s + chunk].to(torch.float64) @ V for s in range(0, W.shape[0], chunk)])


def principal_rows(
    grad_a: torch.Tensor, max_rows: int | None = None, rtol: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce the C×m second-layer gradient to its K principal rows, without summing them.

    ``∇_A L = Rᵀ Σ`` has rank ≤ min(B, C-1) (cross-entropy rows sum to zero, so a plain
    sum cancels the signal exactly). The rows ``Qᵀ ∇_A`` keep all the information.

    :returns: ``Q`` (C, K) orthonormal, ``Y = Qᵀ ∇_A`` (K, m) in float64.
    """
    G = grad_a.to(torch.float64)
    evals, evecs = torch.linalg.eigh(G @ G.T)
    evals, evecs = evals.flip(0), evecs.flip(1)
    s = evals.clamp_min(0).sqrt()
    k = int((s > rtol * s[0]).sum()) if float(s[0]) > 0 else 0
    if max_rows is not None:
        k = min(k, max_rows)
    Q = evecs[:, : max(k, 1)]
    return Q, Q.T @ G


def regress_out(Y: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """``Y`` minus its least-squares fit on the columns of ``feats`` (m, F): a control variate."""
    coef = lstsq(feats, Y.T)
    return Y - (feats @ coef).T


def lower_order_features(U: torch.Tensor, order: int) -> torch.Tensor:
    """Hermite features of the orders below ``order`` with its parity (excluding order 0):
    ``u`` for order 3; ``{u_a u_b - δ_ab}`` (a ≤ b) for order 4."""
    if order % 2 == 1:
        return U
    B = U.shape[1]
    ia, ib = torch.triu_indices(B, B)
    f = U[:, ia] * U[:, ib]
    f[:, ia == ib] -= 1
    return f


# --------------------------------------------------------------------------- Stein estimator


def hermite_moment(Y: torch.Tensor, U: torch.Tensor, order: int, chunk: int = 20000) -> torch.Tensor:
    """The Stein estimator ``T_k = (1/m) Σ_j Y_kj He_order(u_j)`` in the projected space.

    :param Y: (K, m) observations (already centred if wanted).
    :param U: (m, B) projected standard-normal weights.
    :returns: (K, B, …, B) with ``order`` trailing axes.
    """
    if order not in (2, 3, 4):
        raise ValueError("order must be 2, 3 or 4")
    K, m = Y.shape
    B = U.shape[1]
    dt, dev = torch.float64, U.device
    S0 = Y.sum(1)
    S1 = torch.zeros(K, B, dtype=dt, device=dev)
    S2 = torch.zeros(K, B, B, dtype=dt, device=dev)
    Sp = torch.zeros(K, B ** max(order - 2, 0), B * B, dtype=dt, device=dev)
    for s in range(0, m, chunk):
        u = U[s : s + chunk].to(dt)
        y = Y[:, s : s + chunk].to(dt)
        S1 += y @ u
        yu = y[:, :, None] * u[None]  # (K, n, B)
        S2 += yu.transpose(1, 2) @ u
        if order >= 3:
            uu = (u[:, :, None] * u[:, None, :]).reshape(len(u), B * B)
            left = yu if order == 3 else (y[:, :, None] * uu[None])
            Sp += left.transpose(1, 2) @ uu
    S0, S1, S2, Sp = S0 / m, S1 / m, S2 / m, Sp / m
    eye = torch.eye(B, dtype=dt, device=dev)
    if order == 2:
        return S2 - S0[:, None, None] * eye
    if order == 3:
        T = Sp.reshape(K, B, B, B)
        T = T - (
            torch.einsum("ka,bc->kabc", S1, eye)
            + torch.einsum("kb,ac->kabc", S1, eye)
            + torch.einsum("kc,ab->kabc", S1, eye)
        )
        return T
    T = Sp.reshape(K, B, B, B, B)
    six = (
        torch.einsum("kab,cd->kabcd", S2, eye)
        + torch.einsum("kac,bd->kabcd", S2, eye)
        + torch.einsum("kad,bc->kabcd", S2, eye)
        + torch.einsum("kbc,ad->kabcd", S2, eye)
        + torch.einsum("kbd,ac->kabcd", S2, eye)
        + torch.einsum("kcd,ab->kabcd", S2, eye)
    )
    dd = (
        torch.einsum("ab,cd->abcd", eye, eye)
        + torch.einsum("ac,bd->abcd", eye, eye)
        + torch.einsum("ad,bc->abcd", eye, eye)
    )
    return T - six + S0[:, None, None, None, None] * dd


def _linear_features(W: torch.Tensor, start: int, chunk: int, scale: float) -> torch.Tensor:
    """``[1, scale·w_j]`` for the rows ``start … start+chunk`` of ``W``, in float64."""
    rows = W[start : start + chunk].to(torch.float64) * scale
    return torch.cat([torch.ones(len(rows), 1, dtype=torch.float64, device=W.device), rows], 1)


def _regress_linear(Y: torch.Tensor, W: torch.Tensor, scale: float, chunk: int = 20000) -> torch.Tensor:
    """``Y`` minus its least-squares fit on ``[1, scale·w_j]`` (orders 0 and 1: control variates
    for the order-2 and order-3 span estimators), by streamed normal equations."""
    K, m = Y.shape
    d = W.shape[1]
    A = torch.zeros(d + 1, d + 1, dtype=torch.float64, device=W.device)
    b = torch.zeros(d + 1, K, dtype=torch.float64, device=W.device)
    for s in range(0, m, chunk):
        f = _linear_features(W, s, chunk, scale)
        A += f.T @ f
        b += f.T @ Y[:, s : s + chunk].T
    coef = torch.linalg.solve(A, b)  # (d+1, K)
    out = Y.clone()
    for s in range(0, m, chunk):
        out[:, s : s + chunk] -= (_linear_features(W, s, chunk, scale) @ coef).T
    return out


def _stacked_order2(Y: torch.Tensor, W: torch.Tensor, scale: float, chunk: int) -> torch.Tensor:
    K, m = Y.shape
    d = W.shape[1]
    S2 = torch.zeros(K, d, d, dtype=torch.float64, device=W.device)
    for s in range(0, m, chunk):
        w = W[s : s + chunk].to(torch.float64) * scale
        S2 += (Y[:, s : s + chunk, None] * w[None]).transpose(1, 2) @ w
    M = S2 / m - Y.mean(1)[:, None, None] * torch.eye(d, dtype=torch.float64, device=W.device)
    return torch.cat(list(M), dim=1)  # (d, K d)


def _stacked_order3(
    Y: torch.Tensor, W: torch.Tensor, scale: float, thetas: list[torch.Tensor], chunk: int
) -> torch.Tensor:
    K, m = Y.shape
    d = W.shape[1]
    dt, dev = torch.float64, W.device
    eye = torch.eye(d, dtype=dt, device=dev)
    mats = []
    for theta in thetas:
        acc = torch.zeros(K, d, d, dtype=dt, device=dev)
        s1 = torch.zeros(K, d, dtype=dt, device=dev)
        s0 = torch.zeros(K, dtype=dt, device=dev)
        for s in range(0, m, chunk):
            w = W[s : s + chunk].to(dt) * scale
            t = w @ theta
            yt = Y[:, s : s + chunk] * t[None]
            acc += (yt[:, :, None] * w[None]).transpose(1, 2) @ w
            s1 += Y[:, s : s + chunk] @ w
            s0 += yt.sum(1)
        acc, s1, s0 = acc / m, s1 / m, s0 / m
        M = (
            acc
            - s0[:, None, None] * eye
            - s1[:, :, None] * theta[None, None, :]
            - theta[None, :, None] * s1[:, None, :]
        )
        mats.extend(list(M))
    return torch.cat(mats, dim=1)  # (d, K d probes)


def span_from_tensor(
    Y: torch.Tensor,
    W: torch.Tensor,
    scale: float,
    order: int,
    k: int | None,
    gen: torch.Generator,
    probes: int = 2,
    chunk: int = 20000,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Span without ``∇_W``: the order-2 estimator (μ₂ ≠ 0) or, for odd σ, the order-3 one contracted with
    random θ's, every observation row stacked; top singular (= |eigen|) vectors.

    * order 2: ``(1/m) Σ_j Y_kj (w_j w_jᵀ - I)`` → ``μ₂ Σ_i R_ki x_i x_iᵀ``.
    * order 3: ``(1/m) Σ_j Y_kj [(θᵀw_j) w_j w_jᵀ - (θᵀw_j) I - w_j θᵀ - θ w_jᵀ]`` →
      ``μ₃ Σ_i R_ki (θᵀx_i) x_i x_iᵀ``.

    Orders 0 and 1 are regressed out of ``Y`` first (control variates). When ``k`` is None the
    batch size is the number of singular values above 1.5 times the largest one of a null estimator
    (the same statistic with the observations multiplied by random signs, which keeps the
    noise level and removes the signal).

    :param W: (m, d) attacker weights, ``scale·W`` standard normal.
    :returns: ``V`` (d, k), singular values, null singular values.
    """
    m = Y.shape[1]
    d = W.shape[1]
    Yr = _regress_linear(Y, W, scale, chunk)
    xi = (torch.randint(0, 2, (m,), generator=gen) * 2 - 1).to(Y)
    thetas = [torch.randn(d, generator=gen, dtype=torch.float64).to(W.device) for _ in range(probes)]

    def stat(y: torch.Tensor) -> torch.Tensor:
        return _stacked_order2(y, W, scale, chunk) if order == 2 else _stacked_order3(y, W, scale, thetas, chunk)

    Uu, sv, _ = torch.linalg.svd(stat(Yr), full_matrices=False)
    null = torch.linalg.svdvals(stat(Yr * xi[None]))
    if k is None:
        k = max(1, int((sv > 1.5 * null[0]).sum()))
    return Uu[:, :k], sv, null


# --------------------------------------------------------------------------- decomposition


def _design(Vc: np.ndarray, p: int) -> np.ndarray:
    """Columns ``vec(v_i^{⊗p})``: (B^p, n) for ``Vc`` (B, n)."""
    n = Vc.shape[1]
    out = Vc
    for _ in range(p - 1):
        out = np.einsum("an,bn->abn", out, Vc).reshape(-1, n)
    return out


def _design_t(V: torch.Tensor, p: int) -> torch.Tensor:
    """Torch version of :func:`_design`."""
    n = V.shape[1]
    pw = V
    for _ in range(p - 1):
        pw = (pw[:, None, :] * V[None, :, :]).reshape(-1, n)
    return pw


def fit_weights(T: np.ndarray, Vc: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares weights ``λ`` (n, K) of ``T_k ≈ Σ_i λ_ik v_i^{⊗p}`` and the relative residual.

    :param T: (K, B, …, B) tensors; :param Vc: (B, n) components (columns).
    """
    K = T.shape[0]
    p = T.ndim - 1
    Phi = _design(Vc, p)
    Tf = T.reshape(K, -1).T
    lam, *_ = np.linalg.lstsq(Phi, Tf, rcond=None)
    res = Tf - Phi @ lam
    return lam, float(np.linalg.norm(res)) / max(float(np.linalg.norm(Tf)), 1e-300)


def _slice(T: np.ndarray, alpha: np.ndarray, vecs: list[np.ndarray]) -> np.ndarray:
    """``Σ_k α_k T_k(I, I, v_1, …)``: contract all but the first two tensor axes."""
    M = np.tensordot(alpha, T, axes=(0, 0))
    for v in reversed(vecs):
        M = M @ v
    return M


def jennrich(T: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Simultaneous diagonalisation: eigenvectors of ``M_a M_b^{-1}`` (unit columns, (B, B)).

    Handles non-orthogonal components and mixed-sign weights. Rows are combined with
    random Gaussian weights (never summed).
    """
    K = T.shape[0]
    p = T.ndim - 1
    B = T.shape[1]
    a1, a2 = np.asarray(rng.standard_normal(K)), np.asarray(rng.standard_normal(K))
    v1 = [np.asarray(rng.standard_normal(B)) for _ in range(p - 2)]
    v2 = [np.asarray(rng.standard_normal(B)) for _ in range(p - 2)]
    M1, M2 = _slice(T, a1, v1), _slice(T, a2, v2)
    M1, M2 = (M1 + M1.T) / 2, (M2 + M2.T) / 2
    _, vecs = np.linalg.eig(M1 @ np.linalg.pinv(M2))
    Vc = np.real(vecs)
    Vc /= np.maximum(np.linalg.norm(Vc, axis=0, keepdims=True), 1e-300)
    return Vc


def _power_and_grad(V: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``vec(v_i^{⊗p})`` (B^p, n) and its derivative w.r.t. ``v_i`` (B^p, B, n)."""
    B, n = V.shape
    eye = torch.eye(B, dtype=V.dtype, device=V.device)
    pw = _design_t(V, p)
    total = torch.zeros(B**p, B, n, dtype=V.dtype, device=V.device)
    for pos in range(p):
        g = eye[:, :, None].expand(B, B, n) if pos == 0 else V[:, None, :].expand(B, B, n)  # (a_0, b, n)
        for q in range(1, p):
            f = eye[:, :, None].expand(B, B, n) if q == pos else V[:, None, :].expand(B, B, n)  # (a_q, b, n)
            g = (g[:, None, :, :] * f[None, :, :, :]).reshape(-1, B, n)
        total = total + g
    return pw, total


def cp_refine(T: np.ndarray, Vc: np.ndarray, max_iter: int = 50) -> tuple[np.ndarray, float]:
    """Levenberg–Marquardt on the symmetric CP model ``T_k ≈ Σ_i λ_ik v_i^{⊗p}`` over
    ``(v_i, λ)`` with an analytic Jacobian (``λ`` started at its least-squares value);
    returns unit columns and the relative residual."""
    K = T.shape[0]
    p = T.ndim - 1
    B, n = Vc.shape
    Tt = torch.as_tensor(T.reshape(K, -1).T.copy(), dtype=torch.float64)  # (B^p, K)
    scale = float(torch.linalg.norm(Tt)) or 1.0
    lam0, _ = fit_weights(T, Vc)

    def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: B * n].reshape(B, n), x[B * n :].reshape(n, K)

    def fun(x: torch.Tensor) -> torch.Tensor:
        V, lam = unpack(x)
        pw = _design_t(V, p)
        return ((pw @ lam - Tt) / scale).T.reshape(-1)

    def jac(x: torch.Tensor) -> torch.Tensor:
        V, lam = unpack(x)
        pw, dpw = _power_and_grad(V, p)  # (N, n), (N, B, n)
        N = pw.shape[0]
        JV = dpw[None, :, :, :] * lam.T[:, None, None, :]  # (K, N, B, n)
        Jl = torch.zeros(K, N, n, K, dtype=V.dtype)
        idx = torch.arange(K)
        Jl[idx, :, :, idx] = pw[None].expand(K, N, n)
        return torch.cat([JV.reshape(K * N, B * n), Jl.reshape(K * N, n * K)], 1) / scale

    x0 = torch.cat(
        [torch.as_tensor(Vc, dtype=torch.float64).reshape(-1), torch.as_tensor(lam0, dtype=torch.float64).reshape(-1)]
    )
    x, _, _ = levenberg_marquardt(fun, jac, x0, max_iter)
    V = unpack(x)[0].numpy().copy()
    V /= np.maximum(np.linalg.norm(V, axis=0, keepdims=True), 1e-300)
    _, res = fit_weights(T, V)
    return V, res


def decompose(
    T: np.ndarray, n_components: int, restarts: int, rng: np.random.Generator, lm_iter: int = 30
) -> tuple[np.ndarray, np.ndarray, float, dict[str, Any]]:
    """Jennrich with restarts chosen by fit residual (never by ground truth), then LM refinement.

    :param T: (K, B, …, B); :returns: unit components (B, n), weights (n, K), residual, info.
    """
    best: tuple[float, np.ndarray] | None = None
    residuals = []
    for _ in range(max(restarts, 1)):
        Vc = jennrich(T, rng)[:, :n_components]
        _, r = fit_weights(T, Vc)
        residuals.append(r)
        if best is None or r < best[0]:
            best = (r, Vc)
    assert best is not None
    Vc = best[1]
    res0 = best[0]
    if lm_iter > 0:
        V2, r2 = cp_refine(T, Vc, lm_iter)
        if r2 <= res0:
            Vc = V2
    lam, res = fit_weights(T, Vc)
    info = {"jennrich_residuals": [round(r, 6) for r in residuals], "jennrich_residual": res0, "cp_residual": res}
    return Vc, lam, res, info


# --------------------------------------------------------------------------- sign and scale


def hidden_activations(act: str, P: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """``σ(P Z)`` (m, n): the hidden activations for inputs ``V z_i`` given ``P = W V``."""
    return act_fn(act)(P @ Z)


def least_squares(Phi: torch.Tensor, Y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``R`` (K, n) minimising ``‖Y - R Φᵀ‖`` and the relative residual."""
    sol = lstsq(Phi, Y.T)
    res = torch.linalg.norm(Y.T - Phi @ sol) / torch.linalg.norm(Y).clamp_min(1e-300)
    return sol.T, float(res)


def resolve_signs(
    act: str, P: torch.Tensor, Y: torch.Tensor, Zdir: torch.Tensor, rho: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """Signs of the components for non-odd σ: the pattern with the smallest residual of
    ``Y ≈ R σ(P diag(s) Z ρ)`` (all 2^n patterns for n ≤ 10, else greedy flips).

    :returns: signs (n,) of ±1 and the residual.
    """
    n = Zdir.shape[1]
    dt = Zdir.dtype

    def resid(s: torch.Tensor) -> float:
        return least_squares(hidden_activations(act, P, Zdir * (s * rho)[None]), Y)[1]

    if n <= 10:
        best = None
        for pat in itertools.product((1.0, -1.0), repeat=n):
            s = torch.tensor(pat, dtype=dt, device=Zdir.device)
            r = resid(s)
            if best is None or r < best[0]:
                best = (r, s)
        assert best is not None
        return best[1], best[0]
    s = torch.ones(n, dtype=dt, device=Zdir.device)
    cur = resid(s)
    improved = True
    while improved:
        improved = False
        for i in range(n):
            s2 = s.clone()
            s2[i] = -s2[i]
            r = resid(s2)
            if r < cur:
                s, cur, improved = s2, r, True
    return s, cur


def levenberg_marquardt(
    fun: Callable[[torch.Tensor], torch.Tensor],
    jac: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    max_iter: int,
    tol: float = 1e-14,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, float, int]:
    """Small dense Levenberg–Marquardt (normal equations, Marquardt scaling) in torch.

    For tall problems (many residuals, tens of unknowns) this is much faster than
    MINPACK's QR. ``project`` maps each trial point into the feasible set (a box on some
    coordinates): a projected step is accepted only when it lowers the cost, so an interior
    optimum is reached exactly as without it. :returns: ``x``, final ``‖fun(x)‖``, number of
    accepted steps.
    """
    x = x0.clone()
    r = fun(x)
    cost = float(r @ r)
    lam = 1e-3
    steps = 0
    for _ in range(max_iter):
        J = jac(x)
        A = J.T @ J
        g = J.T @ r
        dA = torch.diagonal(A).clamp_min(1e-300)
        accepted = False
        while lam < 1e12:
            try:
                dx = torch.linalg.solve(A + lam * torch.diag(dA), -g)
            except RuntimeError:
                lam *= 10
                continue
            x2 = x + dx if project is None else project(x + dx)
            r2 = fun(x2)
            c2 = float(r2 @ r2)
            if math.isfinite(c2) and c2 < cost:
                x, r, accepted = x2, r2, True
                done = cost - c2 <= tol * max(cost, 1e-300)
                cost = c2
                lam = max(lam / 3, 1e-12)
                break
            lam *= 4
        if not accepted:
            break
        steps += 1
        if done:
            break
    return x, math.sqrt(cost), steps


def _stack_jac(Jz: torch.Tensor, sg: torch.Tensor) -> torch.Tensor:
    """Jacobian of ``res_kj = Σ_i R_ki σ(h_ji(θ)) - Y_kj`` as a (K m, q + K n) matrix, from the
    θ-block ``Jz`` (K, m, q) and the activations ``sg`` (m, n) (the block of ``R``, block diagonal in k)."""
    K, m, q = Jz.shape
    n = sg.shape[1]
    J_R = torch.zeros(K, m, K, n, dtype=sg.dtype, device=sg.device)
    idx = torch.arange(K, device=sg.device)
    J_R[idx, :, idx, :] = sg[None].expand(K, m, n)
    return torch.cat([Jz, J_R.reshape(K, m, K * n)], dim=2).reshape(K * m, q + K * n)


def fit_norms(
    act: str,
    P: torch.Tensor,
    Y: torch.Tensor,
    Zdir: torch.Tensor,
    rho0: torch.Tensor,
    max_iter: int = 30,
    rho_max: float = math.inf,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Norms ``ρ_i`` by nonlinear least squares of ``Y ≈ R σ(P Z diag(ρ))`` over ``(log ρ, R)``
    (Levenberg–Marquardt, analytic Jacobian, ``R`` started at its linear least-squares value).
    Identifiable for non-homogeneous σ (tanh recovers them exactly).

    ``ρ ≤ rho_max`` is enforced by projection: a noisy ``∇_A`` whose rows look like ``±s`` is
    best fitted by a saturated σ, so the unbounded fit drives ρ → ∞ (reconstructions of 1e35).

    :param P: (m, B) projected weights; :param Y: (K, m); :param Zdir: (B, n) unit directions.
    :returns: ``ρ`` (n,), ``R`` (K, n), relative residual.
    """
    n = Zdir.shape[1]
    K = Y.shape[0]
    scale = float(torch.linalg.norm(Y)) or 1.0
    H = P @ Zdir  # (m, n) pre-activations of unit-norm inputs
    R0, _ = least_squares(act_fn(act)(H * rho0[None]), Y)

    def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(x[:n]), x[n:].reshape(K, n)

    def fun(x: torch.Tensor) -> torch.Tensor:
        rho, R = unpack(x)
        return ((R @ act_fn(act)(H * rho[None]).T - Y) / scale).reshape(-1)

    def jac(x: torch.Tensor) -> torch.Tensor:
        rho, R = unpack(x)
        sg, ds = act_and_grad(act, H * rho[None])  # (m, n)
        J_rho = R[:, None, :] * (ds * H * rho[None])[None]  # (K, m, n)
        return _stack_jac(J_rho, sg) / scale

    log_max = math.log(rho_max) if math.isfinite(rho_max) else math.inf

    def project(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:n].clamp_max(log_max), x[n:]])

    x0 = project(torch.cat([torch.log(rho0), R0.reshape(-1)]))
    x, res, _ = levenberg_marquardt(fun, jac, x0, max_iter, project=None if math.isinf(log_max) else project)
    rho, R = unpack(x)
    return rho, R, res


def refine_second_layer(
    act: str, P: torch.Tensor, Y: torch.Tensor, Z0: torch.Tensor, R0: torch.Tensor, max_iter: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Gradient matching on the second-layer gradient in the recovered span: Levenberg–Marquardt
    on ``Y_kj ≈ Σ_i R_ki σ(P_j · z_i)`` over ``Z`` (B, n) and ``R`` (K, n), analytic Jacobian.

    The model is exact (no Monte-Carlo noise), so a good start converges to the truth.
    :returns: ``Z``, ``R``, relative residual.
    """
    B, n = Z0.shape
    K, m = Y.shape
    scale = float(torch.linalg.norm(Y)) or 1.0

    def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[: B * n].reshape(B, n), x[B * n :].reshape(K, n)

    def fun(x: torch.Tensor) -> torch.Tensor:
        Z, R = unpack(x)
        return ((R @ act_fn(act)(P @ Z).T - Y) / scale).reshape(-1)

    def jac(x: torch.Tensor) -> torch.Tensor:
        Z, R = unpack(x)
        sg, ds = act_and_grad(act, P @ Z)  # (m, n)
        # d res_kj / d Z_bi = R_ki σ'_ji P_jb
        JZ = (R[:, None, None, :] * ds[None, :, None, :] * P[None, :, :, None]).reshape(K, m, B * n)
        return _stack_jac(JZ, sg) / scale

    x, res, _ = levenberg_marquardt(fun, jac, torch.cat([Z0.reshape(-1), R0.reshape(-1)]), max_iter)
    Z, R = unpack(x)
    return Z, R, res


def ce_norms(
    beta: torch.Tensor,
    Xdir: torch.Tensor,
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    iters: int = 5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms for homogeneous σ from cross-entropy consistency.

    Only ``β_i = ρ_i r_i`` (C,) is identified; for the mean cross-entropy
    ``r_i = (softmax(f(x_i)) - e_{y_i}) / B``, so ``ρ_i = ‖β_i‖ / ‖r_i‖`` (fixed point,
    since ``f`` depends weakly on ``ρ``). ``y_i = argmin_c β_ic``.

    :param beta: (n, C); :param Xdir: (n, d) unit directions.
    :returns: ``ρ`` (n,), labels (n,).
    """
    labels = beta.argmin(dim=1)
    rho = torch.ones(len(beta), dtype=beta.dtype, device=beta.device)
    bn = beta.norm(dim=1)
    for _ in range(iters):
        p = torch.softmax(logits_fn(Xdir * rho[:, None]).to(beta.dtype), dim=1)
        r = (p - F.one_hot(labels, beta.shape[1]).to(beta.dtype)) / batch_size
        rho = bn / r.norm(dim=1).clamp_min(1e-300)
    return rho, labels
