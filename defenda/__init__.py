"""defenda: privacy/utility trade-offs of federated-learning defenses against gradient inversion.

The one import surface for plugin authors and users::

    from defenda import Attack, Defense, Metric, Task          # base classes to subclass
    from defenda import SharedUpdate, Knowledge, Reconstruction, Requirements, RoundSettings, TaskData
    from defenda import hookimpl, param                        # registration and parameters
    from defenda import reconstruct, run_study                 # the Python API

Light at import: the torch-heavy names are imported on first use, so
``defenda --version`` and plugin listings stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from defenda.hookspecs import hookimpl
from defenda.params import param

if TYPE_CHECKING:  # what type checkers see; at runtime these names are imported on first use (below)
    from defenda.api import reconstruct, run_study  # noqa: F401
    from defenda.errors import DefendaError, ParamError, UnsupportedError  # noqa: F401
    from defenda.interfaces import Attack, Defense, EmptyParams, Metric, Task  # noqa: F401
    from defenda.records import (  # noqa: F401
        KNOWLEDGE_FLAGS,
        FederationPlan,
        InputSpace,
        Knowledge,
        Reconstruction,
        Requirements,
        RoundSettings,
        ServerKind,
        SharedUpdate,
        TaskData,
        TaskKind,
        UpdateKind,
    )

__version__ = "0.1.0"

_LAZY = {
    # base classes (defenda.interfaces)
    "Attack": "defenda.interfaces",
    "Defense": "defenda.interfaces",
    "Metric": "defenda.interfaces",
    "Task": "defenda.interfaces",
    "EmptyParams": "defenda.interfaces",
    # data records (defenda.records)
    "InputSpace": "defenda.records",
    "TaskData": "defenda.records",
    "RoundSettings": "defenda.records",
    "FederationPlan": "defenda.records",
    "SharedUpdate": "defenda.records",
    "Knowledge": "defenda.records",
    "Reconstruction": "defenda.records",
    "Requirements": "defenda.records",
    "KNOWLEDGE_FLAGS": "defenda.records",
    "UpdateKind": "defenda.records",
    "ServerKind": "defenda.records",
    "TaskKind": "defenda.records",
    # errors a plugin raises or catches
    "UnsupportedError": "defenda.errors",
    "ParamError": "defenda.errors",
    "DefendaError": "defenda.errors",
    # the Python API
    "reconstruct": "defenda.api",
    "run_study": "defenda.api",
}

__all__ = ["__version__", "hookimpl", "param", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defenda' has no attribute {name!r}")
