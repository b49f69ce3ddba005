"""Linear-algebra helpers shared by the attacks of this package (SPEAR, Stein)."""

from __future__ import annotations

import torch


def estimate_rank(s: torch.Tensor, rtol: float) -> int:
    """Numerical rank from singular values ``s`` (descending): those above ``rtol · s_1``; when
    none drops below the tolerance (a noisy update), the position of the largest gap in ``log s``."""
    s = s.clamp_min(0)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    rel = s / s[0]
    r = int((rel > rtol).sum())
    if r < s.numel():
        return r
    logs = torch.log(rel.clamp_min(1e-300))
    gaps = logs[:-1] - logs[1:]
    return int(torch.argmax(gaps)) + 1 if gaps.numel() else r


def lstsq(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``argmin_X ‖A X − B‖`` by :func:`torch.linalg.lstsq`, with the driver pinned on the CPU.

    The CPU default (``gelsy``, QR with column pivoting) is not bitwise reproducible across
    runs: its last bits vary with the blocking and threading LAPACK picks. ``gelsd`` (SVD,
    divide and conquer) is deterministic for the same inputs; CUDA has only ``gels``.
    """
    driver = "gelsd" if A.device.type == "cpu" else None
    return torch.linalg.lstsq(A, B, driver=driver).solution


# Batched LU (getrf) in the CPU build of torch 2.13 with MKL 2024.2 fails for matrices from about
# 130×130 up when more than one thread runs: it raises "Pivots given to lu_solve must all be
# greater or equal to 1" or, through solve_ex, returns wrong solutions with info = 0 (residual
# 1e2–1e4 on random 256×256 systems, 2 threads; measured). Unbatched solves and batched Cholesky,
# QR, SVD and eigvalsh are correct there.
_BATCHED_LU_MAX = 128


def solve(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``A X = B`` for a batch of square ``A`` (…×n×n): ``(X, info)`` as :func:`torch.linalg.solve_ex`.

    Beyond ``_BATCHED_LU_MAX`` on the CPU the batch is solved one matrix at a time (see above).
    """
    n, lead = A.shape[-1], A.shape[:-2]
    if A.device.type != "cpu" or n <= _BATCHED_LU_MAX or lead.numel() <= 1:
        return torch.linalg.solve_ex(A, B)
    Af, Bf = A.reshape(-1, n, n), B.reshape(-1, *B.shape[len(lead):])
    sols, infos = zip(*(torch.linalg.solve_ex(a, b) for a, b in zip(Af, Bf)))
    return torch.stack(sols).reshape(*lead, *B.shape[len(lead):]), torch.stack(infos).reshape(lead)


def solve_spd(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``A X = B`` for a batch of symmetric positive definite ``A`` by Cholesky (not LU: see above);
    a matrix whose factorisation fails is solved alone."""
    L, info = torch.linalg.cholesky_ex(A)
    X = torch.cholesky_solve(B, L)
    bad = torch.nonzero(info.reshape(-1) != 0).flatten().tolist()
    if bad:
        n = A.shape[-1]
        Xf, Af, Bf = X.reshape(-1, *X.shape[-2:]), A.reshape(-1, n, n), B.reshape(-1, *B.shape[-2:])
        for i in bad:
            Xf[i] = torch.linalg.solve_ex(Af[i], Bf[i])[0]
        X = Xf.reshape(X.shape)
    return X
