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
