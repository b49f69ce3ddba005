"""Old module paths kept for one release: each shim warns once and then *is* the new module."""

from __future__ import annotations

import importlib
import sys
import warnings


def alias(old: str, new: str) -> None:
    """Make ``import old`` yield module ``new`` (same object: attributes and monkeypatches are shared)."""
    warnings.warn(f"{old} moved to {new}; import it from there (the old path goes away in defenda 0.3)",
                  DeprecationWarning, stacklevel=3)
    sys.modules[old] = importlib.import_module(new)
