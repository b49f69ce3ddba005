"""defenda-flower: audit a Flower app with defenda's attacks, and Flower's privacy mods as defenda defenses.

Flower (Beutel et al., "Flower: A Friendly Federated Learning Research Framework",
arXiv 2007.14390) is this package's dependency, never defenda's. This module holds
only the hook implementation and lazy names: ``flwr`` (a few seconds to import) is
imported when a defense or the audit is used, so ``defenda plugins`` stays fast.

The pieces a Flower user touches:

* :class:`~defenda_flower.audit.LeakageAudit` wraps the ServerApp's strategy;
* :class:`~defenda_flower.truth.GroundTruthMod` (a ClientApp mod) and
  :func:`~defenda_flower.truth.record_training_data` (one call in the client's train
  function) let an audit run score reconstructions against what the client trained on;
* :func:`~defenda_flower.inprocess.run_inprocess` runs a ServerApp and a ClientApp in
  this process (no Ray), for tests and machines without Flower's simulation engine.
"""

from __future__ import annotations

from typing import Any, Callable

from defenda import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "LeakageAudit": "defenda_flower.audit",
    "GroundTruthMod": "defenda_flower.truth",
    "record_training_data": "defenda_flower.truth",
    "run_inprocess": "defenda_flower.inprocess",
    "make_grid": "defenda_flower.inprocess",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'defenda_flower' has no attribute {name!r}")


@hookimpl
def defenda_register_defenses(register: Callable[[type], None]) -> None:
    from defenda_flower.defenses import DEFENSES

    for cls in DEFENSES:
        register(cls)
