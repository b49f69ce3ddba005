"""Test helpers for plugin authors: an opt-in pytest plugin plus plain functions.

Enable it in your plugin's ``conftest.py`` (nothing is auto-loaded into
unrelated pytest runs)::

    pytest_plugins = ["defenda.testing"]

Fixtures
    ``defenda_plugins``  a fresh :class:`~defenda.plugins.Plugins` holding only
                         defenda's built-ins (no installed third-party plugin).
    ``defenda_pm``       its pluggy ``PluginManager``.
    ``register_plugin``  ``register_plugin(obj, name=None) -> Plugins``: built-ins plus
                         ``obj`` (a module with hookimpls, or Attack/Defense/Metric/Task
                         classes), loaded in strict mode and made the process-wide
                         plugin set for this test only (so studies and the in-process
                         CLI use it); undone after the test.
    ``tiny_case``        :func:`make_tiny_case` (2 images 3×8×8, a 2-conv CNN, CPU, seed 0).
    ``defenda_cli``      :func:`run_cli`.

Contract checks (each raises ``AssertionError`` listing every problem found)
    :func:`check_attack`, :func:`check_defense`, :func:`check_metric`: the class is
    well declared (slug, ``Params`` with defaults and help, a defense's strength),
    constructs with defaults, runs on a tiny CPU case within a time budget, returns
    the right types and shapes, leaves the caller's model untouched, and gives the
    same result twice under the same seed.

End to end
    :func:`run_cli` runs ``defenda …`` in-process (sees ``register_plugin``) or in a
    subprocess (sees what is installed); :func:`assert_installed` checks that an
    installed distribution's plugin loads and provides what it should.

Modules
    :mod:`~defenda.testing.plugin_sets` (built-ins plus plugins under test),
    :mod:`~defenda.testing.tiny` (the tiny case), :mod:`~defenda.testing.checks`
    (the contract checks, on the validators of :mod:`defenda.contracts`, with
    their shared steps in :mod:`~defenda.testing.probes`), :mod:`~defenda.testing.cli`
    (end to end), :mod:`~defenda.testing.fixtures` (the pytest fixtures, imported
    here so that pytest finds them in this plugin module), :mod:`~defenda.testing.trials`
    (:func:`~defenda.testing.trials.harness_trial`: one attack trial seeded as the
    harness seeds it, outside a study, for quality tests and attack benchmarks).
"""

from __future__ import annotations

from defenda.testing.checks import check_attack, check_defense, check_metric
from defenda.testing.cli import CliOutcome, assert_installed, run_cli
from defenda.testing.fixtures import (  # pytest finds the fixtures in this plugin module's namespace
    defenda_cli,  # noqa: F401
    defenda_plugins,  # noqa: F401
    defenda_pm,  # noqa: F401
    register_plugin,  # noqa: F401
    tiny_case,  # noqa: F401
)
from defenda.testing.plugin_sets import builtin_entry_points, builtin_plugins, plugin_module, registered
from defenda.testing.tiny import TinyCase, make_tiny_case

__all__ = [
    "CliOutcome",
    "TinyCase",
    "assert_installed",
    "builtin_entry_points",
    "builtin_plugins",
    "check_attack",
    "check_defense",
    "check_metric",
    "make_tiny_case",
    "plugin_module",
    "registered",
    "run_cli",
]

