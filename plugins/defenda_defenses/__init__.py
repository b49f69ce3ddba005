"""Built-in defenses, registered through the ``defenda`` entry-point group like any plugin."""

from __future__ import annotations

from typing import Callable

from defenda import hookimpl


@hookimpl
def defenda_register_defenses(register: Callable[[type], None]) -> None:
    from defenda_defenses.baseline import NoDefense
    from defenda_defenses.noise import GaussianNoise

    for cls in (NoDefense, GaussianNoise):
        register(cls)
