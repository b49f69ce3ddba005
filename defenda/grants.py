"""What an attacker is told: the :class:`~defenda.records.Knowledge` for a set of granted flags.

One builder for the harness (each trial) and the plugin authors' test helper
(the tiny case), so both grant exactly the same values for the same flags.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from defenda.federation.history import GradientHistory
from defenda.models import bn_stats
from defenda.records import KNOWLEDGE_FLAGS, Knowledge, TaskData


def grant_knowledge(flags: Iterable[str], data: TaskData, model: nn.Module, y: torch.Tensor, *, lr: float,
                    device: torch.device, seed: int, cache_dir: str | None = None) -> Knowledge:
    """The knowledge of an attacker granted ``flags`` about the victim batch's labels ``y``.

    Each granted flag sets its field (labels, batch size, the public split, the client's
    lr, a gradient history replayed from the public split, the model's BatchNorm
    statistics); every other field stays None, so ``Knowledge.granted`` equals ``flags``.
    """
    granted = set(flags)
    unknown = sorted(granted - set(KNOWLEDGE_FLAGS))
    if unknown:
        raise ValueError(f"unknown knowledge flags {unknown}; known: {list(KNOWLEDGE_FLAGS)}")
    return Knowledge(
        space=data.space,
        batch_size=len(y) if "batch_size" in granted else None,
        labels=y.to(device) if "labels" in granted else None,
        public=data.public if "public_data" in granted else None,
        lr=lr if "lr" in granted else None,
        history=GradientHistory(*data.public, lr=lr) if "gradient_history" in granted else None,
        bn_stats=bn_stats(model) if "bn_stats" in granted else None,
        device=device, seed=seed, cache_dir=cache_dir,
    )
