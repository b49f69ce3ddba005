"""``none``: the undefended client, the reference point of every trade-off curve."""

from __future__ import annotations

from defenda.interfaces import Defense


class NoDefense(Defense):
    """No defense: the client shares its honest update."""

    name = "none"
