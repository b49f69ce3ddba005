"""The layout stays as docs/architecture.md describes it: no import cycle, a leaf records module,
a core that never imports a plugin, one import style for plugins, short functions, old paths that warn."""

from __future__ import annotations

import ast
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "defenda"
PLUGIN_ROOTS = [ROOT / "plugins", ROOT / "plugins" / "soteria"]
PLUGIN_PACKAGES = ("defenda_attacks", "defenda_defenses", "defenda_metrics", "defenda_tasks", "defenda_soteria")
#: old module paths kept for one release (each only aliases its new home)
SHIMS = {"defenda.client": "defenda.federation.client", "defenda.trial": "defenda.harness.trial",
         "defenda.study": "defenda.harness.study", "defenda.runner": "defenda.harness.runner",
         "defenda.store": "defenda.harness.store", "defenda.report": "defenda.harness.report",
         "defenda.utility": "defenda.harness.utility"}
MAX_FUNCTION_LINES = 120


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def core_modules() -> dict[str, Path]:
    return {module_name(p, ROOT): p for p in sorted(CORE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def runtime_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The defenda modules ``path`` imports when it runs (module level and inside functions),
    leaving out imports under ``if TYPE_CHECKING:`` (annotations only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = core_modules()
    known = set(modules)
    return {name: runtime_imports(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``a → b → … → a``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_defenda_modules() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "defenda.harness.trial" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_records_is_a_leaf_and_errors_too() -> None:
    graph = import_graph()
    assert graph["defenda.records"] == set()
    assert graph["defenda.errors"] == set()


def test_the_core_never_imports_a_plugin() -> None:
    for name, path in core_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.split(".")[0] in PLUGIN_PACKAGES]
            assert not bad, f"{name} imports plugin module {bad[0]}"


def test_the_new_layout_has_no_shim_in_use() -> None:
    """Nothing in defenda imports an old path; the shims only alias."""
    graph = import_graph()
    for name, deps in graph.items():
        if name not in SHIMS:
            assert not deps & set(SHIMS), f"{name} imports the deprecated {sorted(deps & set(SHIMS))}"


def plugin_files() -> list[Path]:
    return [p for pkg in PLUGIN_PACKAGES for root in PLUGIN_ROOTS for p in sorted((root / pkg).rglob("*.py"))]


def test_plugins_import_the_base_classes_and_records_from_the_package_root() -> None:
    files = plugin_files()
    assert len(files) > 15
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("defenda.interfaces", "defenda.params",
                                                                    "defenda.records"):
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} imports from {node.module}; "
                            f"use `from defenda import ...`")
            if isinstance(node, ast.ImportFrom) and node.module in SHIMS:
                pytest.fail(f"{path.relative_to(ROOT)}:{node.lineno} imports the deprecated {node.module}")


def long_functions(paths: list[Path]) -> list[str]:
    out = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    return out


def test_no_function_is_longer_than_the_limit() -> None:
    assert long_functions(sorted(CORE.rglob("*.py")) + plugin_files()) == []


def test_every_module_imports_in_a_fresh_interpreter_without_deprecation_warnings() -> None:
    names = sorted(n for n in core_modules() if n not in SHIMS)
    code = ("import importlib, warnings\nwarnings.simplefilter('error', DeprecationWarning)\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "import defenda_attacks.gias, defenda_attacks.spear, defenda_attacks.stein, defenda_defenses.dp_sgd\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("old, new", sorted(SHIMS.items()))
def test_old_module_paths_warn_and_are_the_new_module(old: str, new: str) -> None:
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        mod = importlib.import_module(old)
    assert mod is importlib.import_module(new)


def test_records_imported_from_interfaces_warn_but_work() -> None:
    from defenda import SharedUpdate, interfaces

    with pytest.warns(DeprecationWarning, match="from defenda import SharedUpdate"):
        assert interfaces.SharedUpdate is SharedUpdate
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from defenda import Attack, Defense  # noqa: F401 - the documented surface never warns


def test_a_misspelt_requirement_fails_at_construction_naming_the_class_and_the_allowed_values() -> None:
    from defenda import Requirements

    with pytest.raises(ValueError, match=r"unknown knowledge \['label'\]; allowed: \['labels'"):
        Requirements(knowledge={"label"})
    with pytest.raises(ValueError, match=r"in \S*test_architecture\.\S*MyAttack: unknown updates \['grad'\]"):
        class MyAttack:
            requires = Requirements(updates={"grad"})
    with pytest.raises(ValueError, match="server 'evil'"):
        Requirements(server="evil")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must be a set of strings"):
        Requirements(task_kinds="image")  # type: ignore[arg-type]
    assert Requirements(knowledge=["labels"]).knowledge == frozenset({"labels"})  # type: ignore[arg-type]


def test_knowledge_has_one_source_of_truth() -> None:
    import torch

    from defenda import InputSpace, Knowledge

    space = InputSpace("image", (1, 2, 2), 3, torch.tensor([0.5]).view(1, 1, 1), torch.tensor([0.25]).view(1, 1, 1))
    kn = Knowledge(space=space, batch_size=2, lr=0.1)
    assert kn.granted == {"batch_size", "lr"}
    assert Knowledge(space=space).granted == frozenset()
    lo, hi = kn.box  # type: ignore[misc]
    assert torch.allclose(lo, torch.full((1, 2, 2), -2.0)) and torch.allclose(hi, torch.full((1, 2, 2), 2.0))
    assert kn.input_shape == (1, 2, 2) and kn.task_kind == "image" and kn.num_classes == 3
    with pytest.raises(TypeError):
        Knowledge(space=space, granted=frozenset({"labels"}))  # type: ignore[call-arg]
