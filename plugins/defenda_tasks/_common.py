"""Shared pieces of the built-in tasks: the parameters every task declares and the caching base class.

The data loaders (scikit-learn, torchvision) are imported inside methods; the
package's ``__init__`` imports this module only when its hook is called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from defenda import Task, param
from defenda.models import ACTIVATIONS as _MODEL_ACTIVATIONS
from defenda.models import MODEL_FAMILIES

if TYPE_CHECKING:
    from torch import nn

    from defenda import TaskData

#: The activations ``defenda.models.build_model`` knows (the choices of ``act``).
ACTIVATIONS = tuple(_MODEL_ACTIVATIONS)
IMAGE_MODELS = MODEL_FAMILIES


def model_param(default: str, choices: tuple[str, ...] = IMAGE_MODELS) -> Any:
    return param(default, "model family: " + ", ".join(choices), choices=choices)


def test_fraction_param(default: float = 0.2) -> Any:
    return param(default, "fraction of the data held out as the test split (utility)")


def check_split(test_fraction: float, public_fraction: float, max_samples: int | None) -> None:
    """Validate split parameters when a Params is built (ValueError becomes a ParamError)."""
    if not (0 <= test_fraction < 1 and 0 <= public_fraction < 1 and test_fraction + public_fraction < 1):
        raise ValueError(
            f"test_fraction and public_fraction must be in [0, 1) and sum below 1, "
            f"got {test_fraction} and {public_fraction}"
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")


@dataclass(frozen=True)
class TaskParams:
    """The parameters of every built-in task: the model family and the train/test/public split.

    A task's ``Params`` subclasses this (or :class:`ImageTaskParams`) and declares only its
    own fields; a task with a ``test_fraction`` field has it validated with the split, one
    without (an official test split) holds out nothing from its train source.
    """

    model: str = model_param("cnn")
    widths: tuple[int, ...] = param((200,), "hidden-layer widths of the mlp model")
    act: str = param("relu", "activation function of the mlp and cnn models", choices=ACTIVATIONS)
    public_fraction: float = param(
        0.1, "fraction of the data given to the attacker as its public sample (disjoint from train/test)")
    split_seed: int = param(0, "seed of the deterministic train/test/public split and of max_samples' subsample")
    max_samples: int | None = param(None, "read at most this many samples from each source split (default: all)")

    def __post_init__(self) -> None:
        check_split(getattr(self, "test_fraction", 0.0), self.public_fraction, self.max_samples)


@dataclass(frozen=True)
class ImageTaskParams(TaskParams):
    """:class:`TaskParams` of an image task: adds the normalisation layers of convnet and resnet18."""

    norm: str = param("group", "normalisation layers of convnet and resnet18: group (Opacus-compatible) or batch",
                      choices=("group", "batch"))


@dataclass(frozen=True)
class ConvImageTaskParams(ImageTaskParams):
    """:class:`ImageTaskParams` plus the convolutional families' width and head.

    A separate class so that the older tasks' parameter sets — hashed into stored trial
    keys — stay as they were; those tasks build convnet and resnet18 at their default width.
    """

    width: int | None = param(None, "channel width of convnet and resnet18 (None: convnet 16, resnet18 64)")
    head: tuple[int, ...] = param((), "hidden widths of a Linear→ReLU head on the convnet (SPEAR's CNN route needs one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.width is not None and self.width < 1:
            raise ValueError(f"width must be at least 1, got {self.width}")
        if any(w < 1 for w in self.head):
            raise ValueError(f"head widths must be at least 1, got {self.head}")


class CachedTask(Task):
    """A task that loads once per instance and builds its model with :func:`defenda.models.build_model`.

    Subclasses implement :meth:`_load`; their ``Params`` subclass :class:`TaskParams`
    (``model``, ``widths``, ``act``) or :class:`ImageTaskParams` (and ``norm``).
    """

    _data: TaskData | None = None

    def load(self) -> TaskData:
        """The task's data, loaded on first call and cached (deterministic for given Params)."""
        if self._data is None:
            self._data = self._load()
        return self._data

    def _load(self) -> TaskData:
        raise NotImplementedError

    def build_model(self, data: TaskData) -> nn.Module:
        """A freshly initialised model of the configured family (the caller seeds torch)."""
        from defenda.models import build_model

        p = self.params
        return build_model(p.model, data.input_shape, data.num_classes, widths=p.widths, act=p.act,
                           norm=getattr(p, "norm", "group"), width=getattr(p, "width", None),
                           head=getattr(p, "head", ()))

    def __getstate__(self) -> dict[str, Any]:
        # Ship Params, not the cached tensors, to worker processes: reloading is
        # deterministic and cheaper than pickling a whole data set.
        state = dict(self.__dict__)
        state.pop("_data", None)
        return state
