"""Built-in defenses, registered through the ``defenda`` entry-point group like any plugin.

One module per defense family; modules are imported inside the hook so that
importing the package stays light (Opacus is imported only when DP-SGD runs).
"""

from __future__ import annotations

from typing import Callable

from defenda import hookimpl


@hookimpl
def defenda_register_defenses(register: Callable[[type], None]) -> None:
    from defenda_defenses.baseline import NoDefense
    from defenda_defenses.batch import LargeBatch
    from defenda_defenses.dp_fedavg import DPFedAvg
    from defenda_defenses.dp_sgd import DPSGD
    from defenda_defenses.noise import GaussianNoise, LaplaceNoise
    from defenda_defenses.prune import Prune
    from defenda_defenses.quantize import Quantize
    from defenda_defenses.secure_aggregation import SecureAggregation

    for cls in (NoDefense, DPSGD, GaussianNoise, LaplaceNoise, Prune, Quantize, LargeBatch, SecureAggregation,
                DPFedAvg):
        register(cls)
