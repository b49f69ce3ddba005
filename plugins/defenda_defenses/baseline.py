"""``none``: the undefended client, the reference point of every trade-off curve."""

from __future__ import annotations

from defenda import Defense


class NoDefense(Defense):
    """No defense: the client shares its honest update.

    Paper: none (the undefended baseline).

    Acts on: nothing; the server sees the client's honest FedSGD gradient or FedAvg delta,
    with no defense metadata and no masks.

    Arguments:
        none.

    Example::

        [[defenses]]
        name = "none"
    """

    name = "none"
