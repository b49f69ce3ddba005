"""Shared pieces of the built-in tasks: parameter declarations and the caching base class.

Import-light on purpose: torch, scikit-learn and torchvision are imported inside
methods. (``defenda.interfaces`` itself imports torch; the package's
``__init__`` imports this module only when its hook is called.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defenda import param
from defenda.interfaces import Task

if TYPE_CHECKING:
    from torch import nn

    from defenda.interfaces import TaskData

#: Mirrors ``defenda.models.ACTIVATIONS`` (kept literal so declaring Params needs no torch).
ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "gelu")
IMAGE_MODELS = ("mlp", "cnn", "resnet18")


def model_param(default: str, choices: tuple[str, ...] = IMAGE_MODELS) -> Any:
    return param(default, "model family: " + ", ".join(choices), choices=choices)


def widths_param(default: tuple[int, ...] = (200,)) -> Any:
    return param(default, "hidden-layer widths of the mlp model")


def act_param() -> Any:
    return param("relu", "activation function of the mlp and cnn models", choices=ACTIVATIONS)


def norm_param() -> Any:
    return param("group", "normalisation layers of resnet18: group (Opacus-compatible) or batch",
                 choices=("group", "batch"))


def test_fraction_param(default: float = 0.2) -> Any:
    return param(default, "fraction of the data held out as the test split (utility)")


def public_fraction_param(default: float = 0.1) -> Any:
    return param(default, "fraction of the data given to the attacker as its public sample (disjoint from train/test)")


def split_seed_param() -> Any:
    return param(0, "seed of the deterministic train/test/public split and of max_samples' subsample")


def max_samples_param() -> Any:
    return param(None, "read at most this many samples from each source split (default: all)")


def check_split(test_fraction: float, public_fraction: float, max_samples: int | None) -> None:
    """Validate split parameters when a Params is built (ValueError becomes a ParamError)."""
    if not (0 <= test_fraction < 1 and 0 <= public_fraction < 1 and test_fraction + public_fraction < 1):
        raise ValueError(
            f"test_fraction and public_fraction must be in [0, 1) and sum below 1, "
            f"got {test_fraction} and {public_fraction}"
        )
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be at least 1, got {max_samples}")


class CachedTask(Task):
    """A task that loads once per instance and builds its model with :func:`defenda.models.build_model`.

    Subclasses implement :meth:`_load`; their ``Params`` declare ``model``,
    ``widths`` and ``act`` (and ``norm`` for image tasks).
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
                           norm=getattr(p, "norm", "group"))

    def __getstate__(self) -> dict[str, Any]:
        # Ship Params, not the cached tensors, to worker processes: reloading is
        # deterministic and cheaper than pickling a whole data set.
        state = dict(self.__dict__)
        state.pop("_data", None)
        return state
