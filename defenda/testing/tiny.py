"""The tiny case: a small, deterministic CPU task, model and client batch to run a plugin once."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

    from defenda.records import Knowledge, TaskData

#: the client's learning rate on the tiny case (the updates the checks compute, and the ``lr`` knowledge)
TINY_LR = 0.1
#: SGD steps of a FedAvg client on the tiny case
TINY_LOCAL_STEPS = 2


@dataclasses.dataclass
class TinyCase:
    """A tiny, deterministic CPU setting to run a plugin once.

    :ivar data: a :class:`~defenda.records.TaskData` (image: 3×8×8 in [0, 1],
        4 classes; tabular: 10 features, 3 classes), 16 train / 8 test / 8 public samples.
    :ivar model: a fresh model in train mode (image: ``SmallCNN`` with 2 convs
        of 4/8 channels and 2 linear layers; ``model="mlp"``: one hidden layer of 16).
    :ivar x, y: the client's batch (the first ``batch_size`` train samples).
    """

    data: TaskData
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    seed: int = 0

    def fresh_model(self) -> nn.Module:
        """A copy of the case's model, in train mode."""
        return copy.deepcopy(self.model).train()

    def knowledge(self, granted: Sequence[str] = ("batch_size",)) -> Knowledge:
        """The attacker's knowledge with the given flags granted: each granted flag's field is set, the others None.

        ``bn_stats`` holds the running statistics of the model's BatchNorm layers (empty without one).
        """
        import torch

        from defenda.grants import grant_knowledge

        return grant_knowledge(granted, self.data, self.model, self.y.clone(), lr=TINY_LR,
                               device=torch.device("cpu"), seed=self.seed)


def _tiny_data(kind: str, seed: int) -> tuple[TaskData, int]:
    """The tiny task's data (32 samples: 16 train, 8 test, 8 public) and its number of classes."""
    import torch

    from defenda.data import image_task_data, tabular_task_data

    g = torch.Generator().manual_seed(seed)
    n = 32
    if kind == "image":
        coarse = torch.rand(n, 3, 4, 4, generator=g)
        x = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear", align_corners=False)
        y = torch.arange(n) % 4
        build = image_task_data
        classes = 4
    elif kind == "tabular":
        x = torch.randn(n, 10, generator=g) * 2 + 1
        y = torch.arange(n) % 3
        build = tabular_task_data
        classes = 3
    else:
        raise ValueError(f"kind must be 'image' or 'tabular', got {kind!r}")
    return build("tiny", classes, (x[:16], y[:16]), (x[16:24], y[16:24]), (x[24:], y[24:])), classes


def _tiny_model(kind: str, arch: str, data: TaskData, classes: int) -> nn.Module:
    """A freshly initialised ``"cnn"`` or ``"mlp"`` for the tiny task (the caller seeds torch)."""
    from defenda.models import MLP, SmallCNN

    if arch == "cnn":
        if kind != "image":
            raise ValueError("model 'cnn' needs kind='image'")
        return SmallCNN(3, 8, classes, channels=4, hidden=16)
    if arch == "mlp":
        return MLP(math.prod(data.input_shape), classes, (16,))
    raise ValueError(f"model must be 'cnn' or 'mlp', got {arch!r}")


def make_tiny_case(kind: str = "image", *, model: str | None = None, batch_size: int = 2, seed: int = 0) -> TinyCase:
    """The tiny case: ``kind`` ``"image"`` (``model`` ``"cnn"`` or ``"mlp"``) or ``"tabular"`` (``"mlp"``)."""
    import torch

    data, classes = _tiny_data(kind, seed)
    torch.manual_seed(seed)
    net = _tiny_model(kind, model or ("cnn" if kind == "image" else "mlp"), data, classes)
    if not 1 <= batch_size <= 16:
        raise ValueError("batch_size must be in 1..16")
    return TinyCase(data=data, model=net.train(), x=data.train[0][:batch_size].clone(),
                    y=data.train[1][:batch_size].clone(), seed=seed)
