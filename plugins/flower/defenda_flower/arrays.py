"""Between Flower's records and defenda's: a torch model ↔ an ``ArrayRecord``, a reply ↔ a ``SharedUpdate``.

The update the audit attacks is ``reply − global`` computed on the arrays exactly as
they travel (``np.subtract`` of the numpy arrays Flower deserialises, in their own
dtype), so it is the very difference Flower's DP wrappers clip
(``flwr.supercore.differential_privacy.compute_clip_model_update``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from defenda import SharedUpdate


def model_arrays(model: nn.Module) -> Any:
    """The model's ``state_dict`` as a Flower ``ArrayRecord`` (what a ServerApp sends)."""
    from flwr.app import ArrayRecord

    return ArrayRecord({k: v.detach().cpu() for k, v in model.state_dict().items()})


def load_arrays(model: nn.Module, record: Any) -> nn.Module:
    """Load a Flower ``ArrayRecord`` (a state dict) into ``model``; returns it."""
    state = {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}
    model.load_state_dict(state)
    return model


def numpy_of(record: Any) -> dict[str, np.ndarray]:
    """The arrays of an ``ArrayRecord`` by key, as Flower deserialises them."""
    return {k: a.numpy() for k, a in record.items()}


def delta_arrays(reply: Any, sent: Any) -> dict[str, np.ndarray]:
    """``reply − sent`` per key (the client's update as the server can compute it)."""
    got, base = numpy_of(reply), numpy_of(sent)
    if list(got) != list(base):
        raise ValueError(f"the reply's arrays {list(got)} do not match the arrays sent {list(base)}")
    return {k: np.subtract(got[k], base[k]) for k in got}


def shared_update(delta: dict[str, np.ndarray], model: nn.Module, *, batch_size: int, local_steps: int,
                  lr: float | None, local_epochs: int = 0, local_batch_size: int = 0,
                  meta: dict[str, Any] | None = None) -> SharedUpdate:
    """A defenda ``delta`` update from per-key differences: one tensor per ``model.named_parameters()``
    entry, in that order (buffers such as BatchNorm statistics are not part of a defenda update)."""
    names = [n for n, _ in model.named_parameters()]
    missing = [n for n in names if n not in delta]
    if missing:
        raise ValueError(f"the reply has no arrays for the model's parameters {missing}")
    tensors = [torch.from_numpy(np.array(delta[n], copy=True)) for n in names]
    return SharedUpdate(tensors=tensors, names=names, kind="delta", batch_size=batch_size,
                        local_steps=max(1, local_steps), lr=lr, local_epochs=local_epochs,
                        local_batch_size=local_batch_size, meta=dict(meta or {}))
