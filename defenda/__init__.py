"""defenda: privacy/utility trade-offs of federated-learning defenses against gradient inversion.

Light at import: the torch-heavy names below are imported on first use, so
``defenda --version`` and plugin listings stay fast.
"""

from __future__ import annotations

from typing import Any

from defenda.hookspecs import hookimpl
from defenda.params import param

__version__ = "0.1.0"

_LAZY = {
    "Attack": "defenda.interfaces",
    "Defense": "defenda.interfaces",
    "Metric": "defenda.interfaces",
    "Task": "defenda.interfaces",
    "TaskData": "defenda.interfaces",
    "SharedUpdate": "defenda.interfaces",
    "Knowledge": "defenda.interfaces",
    "Reconstruction": "defenda.interfaces",
    "Requirements": "defenda.interfaces",
    "reconstruct": "defenda.api",
    "run_study": "defenda.api",
}

__all__ = ["__version__", "hookimpl", "param", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defenda' has no attribute {name!r}")
