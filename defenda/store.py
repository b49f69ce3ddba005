"""Moved to :mod:`defenda.harness.store`; this path works, with a DeprecationWarning, until defenda 0.3."""

from defenda._moved import alias

alias(__name__, "defenda.harness.store")
