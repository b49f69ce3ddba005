"""Plugin parameters declared as data.

Every attack, defense, metric and task class carries a nested frozen dataclass
``Params``. Each field has a default and a help text (``param(...)``); a
defense marks its strength field with ``strength="up"`` (a larger value is a
stronger defense, e.g. noise std) or ``strength="down"`` (a smaller value is
stronger, e.g. quantization bits).

Study files and the Python API pass plain dicts; :func:`build_params` turns
them into a ``Params`` instance, rejecting unknown names with the list of
valid ones and coercing TOML scalars to the declared types.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, Literal

from defenda.errors import ParamError

Direction = Literal["up", "down"]


def param(
    default: Any,
    help: str,  # noqa: A002 - mirrors argparse/tox's vocabulary
    *,
    strength: Direction | None = None,
    choices: tuple[Any, ...] | None = None,
) -> Any:
    """Declare one plugin parameter: a dataclass field with a default and help text.

    :param default: value used when a study does not set it (must be a scalar,
        ``None`` or a tuple of scalars).
    :param help: one line shown by ``defenda attacks`` / ``defenda defenses``.
    :param strength: mark the defense's strength knob; ``"up"`` when larger is
        stronger, ``"down"`` when smaller is stronger.
    :param choices: the allowed values, checked by :func:`build_params`.
    """
    meta = {"help": help, "strength": strength, "choices": choices}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One declared parameter, as listed by the CLI and checked by the registry."""

    name: str
    type: Any
    default: Any
    help: str
    strength: Direction | None
    choices: tuple[Any, ...] | None


def describe(params_cls: type) -> list[ParamInfo]:
    """The declared parameters of a ``Params`` dataclass, in declaration order."""
    hints = typing.get_type_hints(params_cls)
    out = []
    for f in dataclasses.fields(params_cls):
        out.append(
            ParamInfo(
                name=f.name,
                type=hints.get(f.name, Any),
                default=f.default,
                help=f.metadata.get("help", ""),
                strength=f.metadata.get("strength"),
                choices=f.metadata.get("choices"),
            )
        )
    return out


def strength_param(params_cls: type) -> ParamInfo | None:
    """The field marked as strength, or None when the class declares none."""
    marked = [p for p in describe(params_cls) if p.strength]
    return marked[0] if marked else None


def validate_params_class(params_cls: Any) -> list[str]:
    """Problems with a ``Params`` declaration (empty list when it is well formed)."""
    if not (isinstance(params_cls, type) and dataclasses.is_dataclass(params_cls)):
        return ["Params must be a dataclass (use @dataclass(frozen=True) and defenda.param)"]
    problems = []
    for f in dataclasses.fields(params_cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            problems.append(f"field '{f.name}' has no default; every Params field needs one")
        if not f.metadata.get("help"):
            problems.append(f"field '{f.name}' has no help text; declare it with defenda.param(default, help)")
    if len([f for f in dataclasses.fields(params_cls) if f.metadata.get("strength")]) > 1:
        problems.append("more than one field is marked as strength")
    try:
        params_cls()
    except Exception as exc:  # the class must construct from defaults alone
        problems.append(f"Params() with defaults fails: {type(exc).__name__}: {exc}")
    return problems


def _coerce(info: ParamInfo, value: Any, owner: str) -> Any:
    """Convert a TOML/JSON scalar to the declared type; raise ParamError when it cannot be."""
    tp = info.type
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        if info.default is None or type(None) in args:
            return None
        raise ParamError(f"{owner}: parameter '{info.name}' cannot be empty (expected {_type_name(tp)})")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        candidates = [a for a in args if a is not type(None)]
        for cand in candidates:
            try:
                return _coerce(dataclasses.replace(info, type=cand), value, owner)
            except ParamError:
                continue
        raise ParamError(f"{owner}: parameter '{info.name}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ParamError(f"{owner}: parameter '{info.name}' must be one of {list(args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ParamError(f"{owner}: parameter '{info.name}' must be a list, got {value!r}")
        elem = args[0] if args else Any
        return tuple(_coerce(dataclasses.replace(info, type=elem), v, owner) for v in value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ParamError(f"{owner}: parameter '{info.name}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ParamError(f"{owner}: parameter '{info.name}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{owner}: parameter '{info.name}' must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{owner}: parameter '{info.name}' must be a string, got {value!r}")
        return value
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def build_params(params_cls: type, values: dict[str, Any] | None, owner: str) -> Any:
    """Build a ``Params`` instance from a dict, with clear one-line errors.

    :param owner: how to name the plugin in errors, e.g. ``"attack 'geiping'"``.
    :raises ParamError: unknown name (with the valid names and a suggestion),
        wrong type, or a value outside the declared choices.
    """
    values = dict(values or {})
    infos = {p.name: p for p in describe(params_cls)}
    unknown = [k for k in values if k not in infos]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(infos), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        valid = ", ".join(infos) or "(none)"
        raise ParamError(f"{owner}: unknown parameter '{key}'.{hint} Valid parameters: {valid}")
    kwargs = {}
    for name, value in values.items():
        info = infos[name]
        coerced = _coerce(info, value, owner)
        if info.choices is not None and coerced not in info.choices:
            raise ParamError(f"{owner}: parameter '{name}' must be one of {list(info.choices)}, got {value!r}")
        kwargs[name] = coerced
    try:
        return params_cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ParamError(f"{owner}: {exc}") from None


def as_dict(params: Any) -> dict[str, Any]:
    """A ``Params`` instance as a plain JSON-friendly dict (tuples become lists)."""
    out = {}
    for f in dataclasses.fields(params):
        v = getattr(params, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
