"""Every registered attack and defense documents itself in one shape (torchattacks-like).

The class docstring reads::

    <one-line summary>.             (what `defenda attacks` / `defenda defenses` shows)

    Paper: <authors>, "<title>", <venue> <year>. <https link>     (or "none (the undefended baseline).")

    Threat model: ...               (attacks)  |  Acts on: ...   (defenses)

    Arguments:
        <field> (<type>, <default>): <one line>.     (every Params field, in declaration order)

    Shapes:                         (attacks; defenses keep every tensor's shape and say in
        ...                          "Acts on:" what they change, so the section is optional)

    Example::

        <a study table or Python use>

The built-ins are loaded like any plugin; the Soteria plugin is checked when it is installed.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re

import pytest

from defenda.testing import builtin_plugins

HEADERS = ("Paper:", "Threat model:", "Acts on:", "Arguments:", "Shapes:", "Example::")
ENTRY = re.compile(r"^    (\w+) \((.*)$")  # "    name (type, default): help", continuation lines deeper


def _classes() -> list[tuple[str, type]]:
    registry = builtin_plugins().registry
    found = [(kind, e.cls) for kind in ("attack", "defense") for e in registry.entries(kind)]
    try:
        from defenda_soteria.soteria import Soteria
    except ImportError:  # a separate distribution (installed by tox -e plugin)
        pass
    else:
        found.append(("defense", Soteria))
    return found


CLASSES = _classes()


def _sections(cls: type) -> tuple[str, dict[str, list[str]]]:
    """The summary line and the lines of each section, keyed by its header."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    sections: dict[str, list[str]] = {}
    current = None
    for line in lines[1:]:
        header = next((h for h in HEADERS if line.startswith(h)), None)
        if header is not None:
            assert header not in sections, f"{cls.__name__}: section {header!r} appears twice"
            current = header
            sections[header] = [line[len(header):].strip()] if line[len(header):].strip() else []
        elif current is not None:
            sections[current].append(line)
    return (lines[0] if lines else ""), sections


def _entry(line: str) -> tuple[str, str, str] | None:
    """``(name, type, default)`` of an Arguments entry line, or None for a continuation line."""
    m = ENTRY.match(line)
    if m is None:
        return None
    inner, depth = m.group(2), 0
    for i, ch in enumerate(inner):  # the parenthesis closing "(type, default)"; types may hold [..] and (..)
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth < 0:
            break
    else:
        return None
    spec, depth, cut = inner[:i], 0, -1
    for j, ch in enumerate(spec):  # the last top-level comma separates the type from the default
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            cut = j
    if cut < 0 or not inner[i + 1 :].startswith(": "):
        return None
    return m.group(1), spec[:cut].strip(), spec[cut + 1 :].strip()


def _ids(item: tuple[str, type]) -> str:
    return f"{item[0]}-{item[1].name}"


def test_every_builtin_is_covered() -> None:
    names = {(kind, cls.name) for kind, cls in CLASSES}
    assert {("attack", "geiping"), ("attack", "gias"), ("attack", "giml"), ("attack", "spear"),
            ("attack", "stein")} <= names
    assert {("defense", n) for n in ("none", "dp-sgd", "gaussian-noise", "laplace-noise", "prune", "quantize",
                                     "large-batch")} <= names


@pytest.mark.parametrize("kind, cls", CLASSES, ids=[_ids(c) for c in CLASSES])
def test_docstring_has_the_sections_in_order(kind: str, cls: type) -> None:
    summary, sections = _sections(cls)
    assert summary.endswith(".") and summary == cls.summary(), f"{cls.__name__}: one-line summary first"
    required = ["Paper:", "Threat model:" if kind == "attack" else "Acts on:", "Arguments:", "Example::"]
    if kind == "attack":
        required.insert(3, "Shapes:")
    missing = [h for h in required if h not in sections]
    assert not missing, f"{cls.__name__} docstring lacks {missing}"
    wrong = "Acts on:" if kind == "attack" else "Threat model:"
    assert wrong not in sections, f"{cls.__name__}: a {kind} has no {wrong!r} section"
    order = [h for h in sections if h in HEADERS]
    assert order == sorted(order, key=HEADERS.index), f"{cls.__name__}: sections out of order: {order}"
    paper = " ".join(sections["Paper:"])
    assert "https://" in paper or paper.startswith("none"), f"{cls.__name__}: Paper: needs a link (or 'none')"
    assert any(line.strip() for line in sections["Example::"]), f"{cls.__name__}: empty example"
    for header in required[1:3]:
        assert any(line.strip() for line in sections[header]), f"{cls.__name__}: empty {header}"


@pytest.mark.parametrize("kind, cls", CLASSES, ids=[_ids(c) for c in CLASSES])
def test_arguments_list_every_param_with_its_default(kind: str, cls: type) -> None:
    _, sections = _sections(cls)
    fields = dataclasses.fields(cls.Params)
    body = [line for line in sections.get("Arguments:", []) if line.strip()]
    if not fields:
        assert [line.strip() for line in body] == ["none."], f"{cls.__name__}: say 'none.' without parameters"
        return
    entries = [e for e in (_entry(line) for line in body) if e]
    assert [name for name, _, _ in entries] == [f.name for f in fields], \
        f"{cls.__name__}: Arguments must list every Params field once, in declaration order"
    for (_, _, default), f in zip(entries, fields):
        try:
            documented = ast.literal_eval(default)
        except (ValueError, SyntaxError):
            pytest.fail(f"{cls.__name__}.{f.name}: default {default!r} is not a Python literal")
        assert documented == f.default, f"{cls.__name__}.{f.name}: documented default {documented!r} != {f.default!r}"
