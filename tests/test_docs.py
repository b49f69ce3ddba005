"""docs/plugins.md cannot drift from the code: hook and method signatures are generated from the
code and must appear verbatim, the examples run and pass the contract checks, and every helper,
switch and hook the page names exists."""

from __future__ import annotations

import inspect
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from defenda import hookspecs, interfaces, params, records, testing
from defenda.testing import check_attack, check_defense, make_tiny_case, registered, run_cli

DOC = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
TEXT = DOC.read_text(encoding="utf-8")
HOOKS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("defenda_") and callable(fn))


def signature(fn: object, name: str | None = None) -> str:
    """``def name(arg: annotation = default, *, ...) -> return`` with annotations as written in the source."""
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    parts: list[str] = []
    star = False
    for p in sig.parameters.values():
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = p.name
        if p.annotation is not p.empty:
            text += f": {p.annotation}"
        if p.default is not p.empty:
            text += f" = {p.default!r}"
        parts.append(text)
    out = f"def {name or fn.__name__}({', '.join(parts)})"  # type: ignore[attr-defined]
    if sig.return_annotation is not sig.empty:
        out += f" -> {sig.return_annotation}"
    return out


def hook_section() -> str:
    return TEXT.split("<!-- hooks -->", 1)[1].split("<!-- /hooks -->", 1)[0]


def example(label: str) -> str:
    block = TEXT.split(f"<!-- example: {label} -->", 1)[1]
    return re.search(r"```python\n(.*?)```", block, re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture
def load_example(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """``load_example(label, module_name)``: run a documented example as an importable module (for this test)."""

    def load(label: str, module: str) -> types.ModuleType:
        mod = types.ModuleType(module)
        monkeypatch.setitem(sys.modules, module, mod)
        exec(compile(example(label), f"{DOC}:{label}", "exec"), mod.__dict__)  # noqa: S102 - our own docs
        return mod

    return load


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_with_its_exact_signature(name: str) -> None:
    fn = getattr(hookspecs, name)
    assert signature(fn) in hook_section(), f"docs/plugins.md must show `{signature(fn)}`"
    assert f"### `{name}`" in hook_section()
    first_line = inspect.getdoc(fn).splitlines()[0]  # type: ignore[union-attr]
    assert first_line in hook_section(), f"docs/plugins.md must describe {name} with: {first_line}"


def test_the_hook_reference_lists_no_other_hook() -> None:
    assert sorted(re.findall(r"^### `(\w+)`", hook_section(), re.M)) == HOOKS


BASE_METHODS = [(cls, name) for cls in (interfaces.Defense, interfaces.Attack, interfaces.Metric, interfaces.Task)
                for name, fn in vars(cls).items() if inspect.isfunction(fn) and not name.startswith("_")]


def test_base_methods_are_found() -> None:
    assert {(c.__name__, n) for c, n in BASE_METHODS} >= {("Defense", "client_update"), ("Attack", "reconstruct"),
                                                           ("Metric", "compute"), ("Task", "build_model")}


@pytest.mark.parametrize("cls, method", BASE_METHODS, ids=[f"{c.__name__}.{n}" for c, n in BASE_METHODS])
def test_base_class_methods_are_documented_with_their_exact_signatures(cls: type, method: str) -> None:
    expected = signature(getattr(cls, method))
    assert expected in TEXT, f"docs/plugins.md must show `{expected}`"


def call_form(fn: object) -> str:
    """``name=default`` form of a signature, without annotations (as the docs show calls)."""
    parts: list[str] = []
    star = False
    for p in inspect.signature(fn).parameters.values():  # type: ignore[arg-type]
        if p.kind is p.VAR_POSITIONAL:
            parts.append(f"*{p.name}")
            star = True
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts)


def test_param_and_requirements_are_documented_exactly() -> None:
    assert signature(params.param) in TEXT
    shown = re.search(r"^(Requirements\(.*\))$", TEXT, re.M).group(1)  # type: ignore[union-attr]
    assert eval(shown, {"Requirements": records.Requirements}) == records.Requirements()  # noqa: S307
    fields = list(inspect.signature(records.Requirements).parameters)
    assert re.findall(r"(\w+)=", shown) == fields


def test_every_testing_helper_is_documented_and_every_documented_one_exists() -> None:
    section = TEXT.split("## 9. Testing a plugin", 1)[1].split("## 10.", 1)[0]
    for name in testing.__all__:
        assert f"`{name}" in section, f"docs/plugins.md does not document defenda.testing.{name}"
    for name in ("defenda_plugins", "defenda_pm", "register_plugin", "tiny_case", "defenda_cli"):
        assert f"`{name}" in section and hasattr(testing, name), name
    for name in ("check_defense", "check_attack", "check_metric", "make_tiny_case", "run_cli",
                 "assert_installed", "registered"):
        shown = re.search(re.escape(name) + r"\(([^`]*)\)`", section).group(1)  # type: ignore[union-attr]
        expected = call_form(getattr(testing, name))
        assert shown.replace('"', "'") == expected, f"docs show {name}({shown}); the code is {name}({expected})"


def test_every_environment_switch_named_exists() -> None:
    source = (Path(__file__).resolve().parents[1] / "defenda" / "plugins.py").read_text()
    for var in set(re.findall(r"DEFENDA_[A-Z_]+", TEXT)):
        assert var in source, var


def test_the_example_defense_passes_the_contract_and_registers(load_example) -> None:
    mod = load_example("defense", "defenda_sparsify")
    check_defense(mod.RandomSparsify)
    update = check_defense(mod.RandomSparsify, {"drop": 0.9})
    assert update.meta["random_sparsify_drop"] == 0.9
    with registered(mod, name="sparsify") as plugins:
        assert plugins.status("sparsify").provides == {"defenses": ["random-sparsify"]}
        run_cli("defenses").assert_success().assert_output_contains("random-sparsify", "[strength, stronger when larger]")


def test_the_example_attack_passes_the_contract_and_is_exact_for_one_sample(load_example) -> None:
    mod = load_example("attack", "defenda_biasratio")
    check_attack(mod.BiasRatio, case=make_tiny_case("tabular"))
    case = make_tiny_case("image", model="mlp", batch_size=1)
    rec = check_attack(mod.BiasRatio, case=case)
    assert torch.allclose(rec.inputs, case.x, atol=1e-4)
    with pytest.raises(AssertionError, match="needs a model whose first layer is nn.Linear"):
        check_attack(mod.BiasRatio)  # the CNN of the default tiny case


def test_the_example_tests_run(load_example) -> None:
    load_example("defense", "defenda_sparsify")
    mod = load_example("tests", "test_sparsify_example")
    mod.test_contract()
    from defenda.plugins import set_plugins

    previous = set_plugins(None)
    try:
        added: list = []

        def register(obj, name=None):  # noqa: ANN001, ANN202 - the fixture's behaviour, without pytest
            added.append((name, obj))
            plugins = testing.builtin_plugins(*[(n, o) for n, o in added])
            set_plugins(plugins)
            return plugins

        mod.test_listed(register, run_cli)
    finally:
        set_plugins(previous)
    with pytest.raises(AssertionError, match="not installed"):
        mod.test_installed()
