"""Import torchvision even when its compiled operators cannot be loaded.

A torchvision wheel built for another torch (e.g. a CUDA build of torchvision
next to a CPU-only torch) fails to load its C++ extension. torchvision's own
Python code tolerates that for most operators, but at import time it also
registers fake (meta) kernels for ``torchvision::nms`` and ``torchvision::qnms``
unconditionally, and that raises::

    RuntimeError: operator torchvision::nms does not exist

and takes the whole package down — models, datasets and transforms included,
although none of them needs a compiled operator. :func:`import_torchvision`
works around it by declaring the missing operator *schemas* (no kernels) with
``torch.library`` and importing again. Calling such an operator still fails
(``torchvision.ops.nms`` has no kernel), which is fine: defenda uses
torchvision's models, datasets and transforms only.

On a machine whose torchvision matches its torch the first, plain import
succeeds and nothing is changed.

``lpips`` imports torchvision at import time, so call :func:`import_torchvision`
before ``import lpips``.
"""

from __future__ import annotations

import re
import sys
from types import ModuleType
from typing import Any

#: Schemas of the operators torchvision's Python code needs to exist at import
#: time (copied from torchvision's C++ ``TORCH_LIBRARY_FRAGMENT`` declarations).
_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

_MISSING_OP = re.compile(r"operator torchvision::(\w+) does not exist")

#: The library holding our schema definitions. It must stay referenced: torch
#: removes a ``Library``'s definitions when the object is garbage-collected.
_LIBRARY: Any = None


def import_torchvision() -> ModuleType:
    """Return the ``torchvision`` module, importing it despite unloadable compiled ops.

    Tries a plain ``import torchvision`` first. Only when that fails with
    ``operator torchvision::<op> does not exist`` for an operator whose schema
    is known here, the schema is declared, the partially imported
    ``torchvision.*`` modules are dropped from ``sys.modules`` and the import is
    retried. Any other error propagates unchanged.

    Call this before ``import lpips`` (lpips imports torchvision).
    """
    for _ in range(len(_SCHEMAS) + 1):
        try:
            import torchvision
        except RuntimeError as exc:
            match = _MISSING_OP.search(str(exc))
            if match is None or match.group(1) not in _SCHEMAS or _op_exists(match.group(1)):
                raise
            _define_schema(match.group(1))
            _forget_partial_import()
        else:
            return torchvision
    raise RuntimeError("torchvision could not be imported even after declaring its operator schemas")


def _op_exists(op: str) -> bool:
    """Whether ``torchvision::op`` is declared (by torchvision's extension or by us)."""
    import torch

    return hasattr(torch.ops.torchvision, op)


def _define_schema(op: str) -> None:
    """Declare ``torchvision::op`` (schema only, no kernel) in our module-level library."""
    global _LIBRARY
    import torch.library

    if _LIBRARY is None:
        # "FRAGMENT" rather than "DEF": it composes with any other fragment of the
        # namespace (torchvision's own or another workaround) instead of claiming it.
        _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
    _LIBRARY.define(_SCHEMAS[op])


def _forget_partial_import() -> None:
    """Drop ``torchvision`` and submodules a failed import left in ``sys.modules``.

    Python removes only the module whose code raised; submodules imported before
    it (``torchvision.extension`` …) stay cached and would otherwise be reused
    half-initialised by the retry.
    """
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
