"""Built-in attacks, registered through the ``defenda`` entry-point group like any plugin.

Attack modules import torch, so each is imported inside the hook.
"""

from __future__ import annotations

from typing import Callable

from defenda import hookimpl


@hookimpl
def defenda_register_attacks(register: Callable[[type], None]) -> None:
    from defenda_attacks.geiping import Geiping
    from defenda_attacks.gias import GIAS
    from defenda_attacks.giml import GIML
    from defenda_attacks.spear import Spear
    from defenda_attacks.stein import Stein

    for cls in (Geiping, GIAS, GIML, Spear, Stein):
        register(cls)
