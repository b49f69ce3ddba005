"""What an attacker is told: the :class:`~defenda.records.Knowledge` for a set of granted flags,
and the :class:`~defenda.records.SharedUpdate` as that attacker may see it.

One builder for the harness (each trial) and the plugin authors' test helper
(the tiny case), so both grant exactly the same values for the same flags; one
filter (:func:`visible_update`) so the update cannot leak what the flags withhold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from defenda.federation.history import GradientHistory
from defenda.models import bn_stats
from defenda.records import KNOWLEDGE_FLAGS, Knowledge, SharedUpdate, TaskData

#: ``SharedUpdate.meta`` keys the server knows by protocol whatever the grants. None today: every
#: built-in key is a defense's internal setting (``noise_scale``, ``client_noise_std``,
#: ``client_batch_size``, ``quant_bits``, ``prune_fraction``, DP calibration, secure-aggregation
#: bookkeeping), and what the tensors themselves show (zeros, quantisation levels) stays visible
#: in them and in ``masks``. A key added here is told to every attacker.
PUBLIC_META_KEYS: frozenset[str] = frozenset()


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


def visible_update(update: SharedUpdate, knowledge: Knowledge) -> SharedUpdate:
    """``update`` as the attacker holding ``knowledge`` may see it: the one place that filters it.

    Kept: the tensors, names, kind and masks (what the server receives), and the protocol the
    server configured (``local_steps``, ``local_epochs``, ``local_batch_size``). ``batch_size``
    only with the ``batch_size`` grant (else 0, "not told"); ``lr`` only with ``lr`` (else None);
    ``meta`` only its :data:`PUBLIC_META_KEYS`. A shallow copy: tensors are shared, not copied.
    """
    granted = knowledge.granted
    return dataclasses.replace(
        update,
        batch_size=update.batch_size if "batch_size" in granted else 0,
        lr=update.lr if "lr" in granted else None,
        meta={k: v for k, v in update.meta.items() if k in PUBLIC_META_KEYS},
    )
