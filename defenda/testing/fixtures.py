"""The pytest fixtures of the opt-in plugin (``pytest_plugins = ["defenda.testing"]``)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from defenda.plugins import Plugins, set_plugins
from defenda.testing.cli import run_cli
from defenda.testing.plugin_sets import _ENV_SWITCHES, _as_plugin, builtin_plugins
from defenda.testing.tiny import TinyCase, make_tiny_case


@pytest.fixture
def defenda_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Plugins]:
    """A fresh plugin set with only defenda's built-ins (no third-party plugin, no env switches)."""
    for var in _ENV_SWITCHES:
        monkeypatch.delenv(var, raising=False)
    yield builtin_plugins()


@pytest.fixture
def defenda_pm(defenda_plugins: Plugins) -> Any:
    """The pluggy ``PluginManager`` of :func:`defenda_plugins`."""
    return defenda_plugins.pm


@pytest.fixture
def register_plugin() -> Iterator[Any]:
    """``register_plugin(obj, name=None) -> Plugins``: built-ins plus ``obj`` (and whatever this
    test registered before), strict, process-wide for this test; restored afterwards."""
    added: list[tuple[str, Any]] = []
    previous = set_plugins(None)

    def register(obj: Any, name: str | None = None) -> Plugins:
        added.append(_as_plugin(obj, name))
        plugins = builtin_plugins(*added)
        set_plugins(plugins)
        return plugins

    try:
        yield register
    finally:
        set_plugins(previous)


@pytest.fixture
def tiny_case() -> TinyCase:
    """:func:`make_tiny_case` with its defaults (image, CNN, batch of 2, seed 0)."""
    return make_tiny_case()


@pytest.fixture
def defenda_cli() -> Any:
    """:func:`run_cli`."""
    return run_cli
