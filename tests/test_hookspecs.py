"""The hook contract: every hook is documented, prefixed and exercised by a test."""

from __future__ import annotations

import inspect
from pathlib import Path

from defenda import hookspecs

HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("defenda_") and callable(fn)]


def test_expected_hooks() -> None:
    assert sorted(HOOKS) == sorted([
        "defenda_register_attacks", "defenda_register_defenses", "defenda_register_metrics",
        "defenda_register_tasks", "defenda_trial_finished",
    ])


def test_every_hook_is_documented_with_its_parameters() -> None:
    for name in HOOKS:
        fn = getattr(hookspecs, name)
        doc = inspect.getdoc(fn) or ""
        assert len(doc.splitlines()[0]) > 20, name
        for param in inspect.signature(fn).parameters:
            assert f":param {param}:" in doc, f"{name} does not document {param}"


def test_every_hook_is_exercised_by_a_test() -> None:
    here = Path(__file__).parent
    text = "\n".join(p.read_text() for p in here.glob("test_*.py") if p.name != Path(__file__).name)
    for name in HOOKS:
        assert f"def {name}(" in text, f"no test implements {name}"
