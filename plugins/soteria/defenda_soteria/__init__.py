"""defenda-soteria: the Soteria defense (Sun et al., CVPR 2021) as a third-party defenda plugin.

This module holds only the hook implementation; the defense itself (and torch)
is imported when the hook runs, so listing plugins stays fast.
"""

from __future__ import annotations

from typing import Callable

from defenda import hookimpl

__version__ = "0.1.0"


@hookimpl
def defenda_register_defenses(register: Callable[[type], None]) -> None:
    from defenda_soteria.soteria import Soteria

    register(Soteria)
