"""Study files (TOML) and their expansion into trials.

A study is a grid: tasks × attacks × defenses × strengths × batch sizes × seeds.
Each plugin table is named by ``name = "…"``; in a plugin's table a list value
is a sweep (for a parameter whose own type is a list, a list of lists is).
Study files are data: they are parsed, never executed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

from defenda.compose import component_names, is_composed
from defenda.errors import DefendaError, ParamError, StudyError
from defenda.federation.settings import FEDERATION_KEYS, FederationSettings
from defenda.harness.jobs import Federation, Trial, UtilityJob, stable_hash
from defenda.params import as_dict, build_params, describe, strength_param
from defenda.records import KNOWLEDGE_FLAGS
from defenda.registry import Registry

#: the [study] table: key -> (type check, description, default)
STUDY_KEYS: dict[str, tuple[type | tuple[type, ...], str, Any]] = {
    "name": (str, "a string", "study"),
    "seeds": (list, "a non-empty list of integers", [0]),
    "batch_sizes": (list, "a non-empty list of positive integers", [1]),
    "rounds": (int, "a non-negative integer (FL rounds of utility training)", 300),
    "client_batch_size": (int, "a positive integer (batch size of utility training)", 32),
    "lr": ((int, float), "a positive number (client/server learning rate)", 0.1),
    "update": (str, "'gradient' (FedSGD) or 'delta' (FedAvg)", "gradient"),
    "local_steps": (int, "a positive integer (FedAvg local steps)", 1),
    "server": (str, "'honest' or 'malicious' (a malicious server may choose the model's weights)", "honest"),
    "knowledge": (list, f"a list of knowledge flags from {list(KNOWLEDGE_FLAGS)}", ["batch_size"]),
    "delta": ((int, float), "the DP δ (0 = 1/len(train split))", 0.0),
    "timeout": ((int, float), "seconds one trial may run before it is stopped as an error (0 = no limit)", 0),
    "memory_limit_gb": ((int, float), "memory one trial's worker may allocate, in GiB (0 = no limit)", 0),
    "save_reconstructions": (bool, "true or false", True),
    "threads": (int, "a positive integer (torch and BLAS threads of each job; the numbers depend on it)", 1),
}

# A study name becomes a directory name: no separators, no leading dot, so it cannot escape runs/.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,99}$")

PLUGIN_SECTIONS = {"task": "task", "tasks": "task", "attacks": "attack", "defenses": "defense"}


@dataclasses.dataclass(frozen=True)
class PluginConfig:
    """One concrete plugin configuration: a registered name and a full parameter dict."""

    kind: str
    name: str
    params: dict[str, Any]
    strength: float | None = None
    #: an attack table's own ``batch_sizes`` (overrides [study] batch_sizes for that attack)
    batch_sizes: tuple[int, ...] | None = None
    #: a task table's ``optional = true``: dropped with a notice when its data files are missing
    optional: bool = False
    #: a task table's ``attacks`` / ``defenses`` / ``seeds``: only those are crossed with this task
    #: (None: all of the study's), so an expensive task can join a study at a smaller size
    scope: TaskScope | None = None

    def label(self) -> str:
        return self.name if self.strength is None else f"{self.name}@{self.strength:g}"


@dataclasses.dataclass(frozen=True)
class TaskScope:
    """What a ``[[tasks]]`` table limits itself to; None in a field: the study's whole list."""

    attacks: tuple[str, ...] | None = None
    defenses: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None

    def admits(self, attack: PluginConfig, defense: PluginConfig) -> bool:
        return ((self.attacks is None or attack.name in self.attacks)
                and (self.defenses is None or defense.name in self.defenses))


def _admitted(task: PluginConfig, attack: PluginConfig, defense: PluginConfig) -> bool:
    return task.scope is None or task.scope.admits(attack, defense)


def _seeds_of(task: PluginConfig, seeds: list[int]) -> list[int]:
    return list(seeds) if task.scope is None or task.scope.seeds is None else list(task.scope.seeds)


@dataclasses.dataclass
class Study:
    """A parsed, validated study: settings plus the plugin configurations to cross."""

    settings: dict[str, Any]
    tasks: list[PluginConfig]
    attacks: list[PluginConfig]
    defenses: list[PluginConfig]
    source: str = "<dict>"
    #: the federations of a ``[federation]`` table (its sweeps expanded); None: the single-client protocol
    federations: list[FederationSettings] | None = None

    @property
    def name(self) -> str:
        return str(self.settings["name"])

    def trials(self) -> list[Trial]:
        """Every cell of the grid as a trial with a stable ``key``."""
        s = self.settings
        out = []
        if self.federations is not None:
            for task, fs, attack, defense in itertools.product(self.tasks, self.federations, self.attacks,
                                                               self.defenses):
                if not _admitted(task, attack, defense):
                    continue
                for bs, seed in itertools.product(attack.batch_sizes or (fs.local_batch_size,),
                                                  _seeds_of(task, s["seeds"])):
                    out.extend(federated_trials(s, task, fs.with_batch_size(bs), attack, defense, seed))
            return out
        for task, attack, defense in itertools.product(self.tasks, self.attacks, self.defenses):
            if not _admitted(task, attack, defense):
                continue
            for bs, seed in itertools.product(attack.batch_sizes or s["batch_sizes"], _seeds_of(task, s["seeds"])):
                out.append(make_trial(s, task, attack, defense, bs, seed))
        return out


def federation_of(s: dict[str, Any]) -> Federation:
    """The federation settings of a parsed [study] table."""
    return Federation(rounds=s["rounds"], client_batch_size=s["client_batch_size"], lr=s["lr"], update=s["update"],
                      local_steps=s["local_steps"], delta=s["delta"])


def make_trial(s: dict[str, Any], task: PluginConfig, attack: PluginConfig, defense: PluginConfig,
               batch_size: int, seed: int) -> Trial:
    """The trial of one grid cell, with its training run (the utility job) attached."""
    fed = federation_of(s)
    utility = UtilityJob(key="", task=task.name, task_params=task.params, defense=defense.name,
                         defense_params=defense.params, strength=defense.strength, seed=seed, federation=fed)
    utility = dataclasses.replace(utility, key=stable_hash(utility.ident()))
    trial = Trial(key="", study=s["name"], attack=attack.name, attack_params=attack.params, batch_size=batch_size,
                  server=s["server"], knowledge=tuple(sorted(s["knowledge"])), utility=utility,
                  timeout=s["timeout"], save_reconstructions=s["save_reconstructions"])
    return dataclasses.replace(trial, key=stable_hash(trial.ident()))


def federated_trials(s: dict[str, Any], task: PluginConfig, fs: FederationSettings, attack: PluginConfig,
                     defense: PluginConfig, seed: int) -> list[Trial]:
    """The trials of one training run in a federation: each attack round × each target client."""
    utility = UtilityJob(key="", task=task.name, task_params=task.params, defense=defense.name,
                         defense_params=defense.params, strength=defense.strength, seed=seed, federation=fs)
    utility = dataclasses.replace(utility, key=stable_hash(utility.ident()))
    out = []
    for r in fs.observed_rounds:
        for target in range(fs.targets_per_round):
            trial = Trial(key="", study=s["name"], attack=attack.name, attack_params=attack.params,
                          batch_size=fs.local_batch_size, server=s["server"], knowledge=tuple(sorted(s["knowledge"])),
                          utility=utility, timeout=s["timeout"], save_reconstructions=s["save_reconstructions"],
                          round=r, target=target)
            out.append(dataclasses.replace(trial, key=stable_hash(trial.ident())))
    return out


#: [study] keys of the single-client protocol that a [federation] table replaces
_SINGLE_CLIENT_KEYS = {"rounds": "rounds", "client_batch_size": "local_batch_size", "lr": "lr", "update": "update",
                       "local_steps": "local_epochs", "delta": "delta", "batch_sizes": "local_batch_size"}


def _parse_federation(raw: Any, study_table: dict[str, Any], source: str) -> list[FederationSettings]:
    """The [federation] table: every key may be a list (a sweep; for attack_rounds a list of lists)."""
    if not isinstance(raw, dict):
        raise _fail(source, "[federation]", "must be a table")
    for key in study_table:
        if key in _SINGLE_CLIENT_KEYS:
            raise _fail(source, f"[study] key '{key}'", f"with a [federation] table, set "
                        f"'{_SINGLE_CLIENT_KEYS[key]}' in [federation] (or batch_sizes in an [[attacks]] table)")
    axes: dict[str, list[Any]] = {}
    for key, value in raw.items():
        if key not in FEDERATION_KEYS:
            import difflib

            close = difflib.get_close_matches(key, list(FEDERATION_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(source, f"[federation] key '{key}'", f"unknown key{hint}; allowed: {', '.join(FEDERATION_KEYS)}")
        if key == "attack_rounds":
            sweep = isinstance(value, list) and bool(value) and isinstance(value[0], list)
            if not isinstance(value, (list, int)) or isinstance(value, bool):
                raise _fail(source, f"[federation] key '{key}'", f"expected a list of rounds, e.g. [0, 99], "
                                                                 f"got {value!r}")
            if isinstance(value, list) and sweep:
                axes[key] = [tuple(v) if isinstance(v, list) else (v,) for v in value]
            else:
                axes[key] = [tuple(value) if isinstance(value, list) else (value,)]
        elif isinstance(value, list):
            if not value:
                raise _fail(source, f"[federation] key '{key}'", "is an empty sweep; give at least one value")
            axes[key] = value
        else:
            axes[key] = [value]
    out = []
    for combo in itertools.product(*axes.values()) if axes else [()]:
        values = dict(zip(axes, combo))
        if isinstance(values.get("alpha"), int) or isinstance(values.get("lr"), int):
            values = {k: float(v) if k in ("alpha", "lr", "server_lr", "delta") and isinstance(v, int)
                      and not isinstance(v, bool) else v for k, v in values.items()}
        try:
            out.append(FederationSettings(**values))
        except (ValueError, TypeError) as exc:
            raise _fail(source, "[federation]", str(exc)) from None
    return out


def load_study(path: str | Path, registry: Registry) -> Study:
    """Read and validate a TOML study file; errors name the file and the key."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise StudyError(f"{p}: study file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StudyError(f"{p}: cannot read study file: {exc}") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"{p}: not valid TOML: {exc}") from None
    return parse_study(raw, registry, source=str(p))


def parse_study(raw: Any, registry: Registry, source: str = "<dict>") -> Study:
    """Validate a study given as a dict (the parsed TOML)."""
    try:
        return _parse(raw, registry, source)
    except StudyError:
        raise
    except DefendaError as exc:
        raise StudyError(f"{source}: {exc}") from None


def _fail(source: str, where: str, what: str) -> StudyError:
    return StudyError(f"{source}: {where}: {what}")


def _parse(raw: Any, registry: Registry, source: str) -> Study:
    if not isinstance(raw, dict):
        raise _fail(source, "top level", "a study must be a table with [study], [task], [[attacks]], [[defenses]]")
    allowed = {"study", "federation", *PLUGIN_SECTIONS}
    for key in raw:
        if key not in allowed:
            raise _fail(source, f"[{key}]", "unknown section; allowed: [study], [federation], [task] (or "
                                            "[[tasks]]), [[attacks]], [[defenses]]")
    if "task" in raw and "tasks" in raw:
        raise _fail(source, "[task]", "give either [task] or [[tasks]], not both")
    settings = _parse_settings(raw.get("study", {}), source)
    task_tables = raw.get("tasks", [raw["task"]] if "task" in raw else None)
    if task_tables is None:
        raise _fail(source, "[task]", "missing; add e.g. [task] name = \"digits\"")
    tasks = _parse_plugin_tables(task_tables, "tasks", "task", registry, source)
    attacks = _parse_plugin_tables(raw.get("attacks"), "attacks", "attack", registry, source)
    defenses = _parse_plugin_tables(raw.get("defenses", [{"name": "none"}]), "defenses", "defense", registry, source)
    _check_scopes(tasks, attacks, defenses, source)
    federations = None
    if "federation" in raw:
        # [[federation]] (an array of tables): several protocols in one study, each with its own sweeps
        tables = raw["federation"] if isinstance(raw["federation"], list) else [raw["federation"]]
        federations = [fs for t in tables for fs in _parse_federation(t, raw.get("study", {}), source)]
        if len(set(federations)) != len(federations):
            raise _fail(source, "[[federation]]", "two tables give the same federation; remove the duplicate")
    return Study(settings, tasks, attacks, defenses, source, federations)


def _parse_settings(table: Any, source: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _fail(source, "[study]", "must be a table")
    out = {}
    for key, value in table.items():
        if key not in STUDY_KEYS:
            import difflib

            close = difflib.get_close_matches(key, list(STUDY_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _fail(source, f"[study] key '{key}'", f"unknown key{hint}; allowed: {', '.join(STUDY_KEYS)}")
        out[key] = value
    settings = {k: out.get(k, default) for k, (_, _, default) in STUDY_KEYS.items()}
    for key, (tp, desc, _) in STUDY_KEYS.items():
        value = settings[key]
        if isinstance(value, bool) and tp is not bool or not isinstance(value, tp):
            raise _fail(source, f"[study] key '{key}'", f"expected {desc}, got {value!r}")
    _check_int_list(settings, "seeds", source, minimum=0)
    _check_int_list(settings, "batch_sizes", source, minimum=1)
    checks = [
        ("rounds", settings["rounds"] >= 0), ("client_batch_size", settings["client_batch_size"] >= 1),
        ("lr", settings["lr"] > 0), ("local_steps", settings["local_steps"] >= 1),
        ("update", settings["update"] in ("gradient", "delta")),
        ("server", settings["server"] in ("honest", "malicious")),
        ("delta", 0 <= settings["delta"] < 1), ("timeout", settings["timeout"] >= 0),
        ("memory_limit_gb", settings["memory_limit_gb"] >= 0), ("threads", settings["threads"] >= 1),
        ("knowledge", all(f in KNOWLEDGE_FLAGS for f in settings["knowledge"])),
    ]
    for key, ok in checks:
        if not ok:
            raise _fail(source, f"[study] key '{key}'", f"expected {STUDY_KEYS[key][1]}, got {settings[key]!r}")
    if not _SAFE_NAME.match(settings["name"]):
        raise _fail(source, "[study] key 'name'", "use letters, digits, '.', '_' and '-' only (it names the "
                    f"output directory runs/<name>), got {settings['name']!r}")
    settings["lr"] = float(settings["lr"])
    return settings


def _check_int_list(settings: dict[str, Any], key: str, source: str, minimum: int) -> None:
    value = settings[key]
    if not value or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in value):
        raise _fail(source, f"[study] key '{key}'", f"expected {STUDY_KEYS[key][1]}, got {value!r}")
    if len(set(value)) != len(value):
        raise _fail(source, f"[study] key '{key}'", f"has duplicates: {value!r}")


def _parse_plugin_tables(tables: Any, section: str, kind: str, registry: Registry, source: str) -> list[PluginConfig]:
    header = f"[[{section}]]" if section != "tasks" else "[task]"
    if tables is None:
        raise _fail(source, header, f"missing; add at least one {header} table with name = \"…\" "
                                    f"(see `defenda {kind}s`)" if kind != "task" else "missing")
    if not isinstance(tables, list) or not tables:
        raise _fail(source, header, "must be a non-empty array of tables")
    configs: list[PluginConfig] = []
    for i, table in enumerate(tables, start=1):
        where = f"{header} #{i}"
        if not isinstance(table, dict):
            raise _fail(source, where, "must be a table")
        name = table.get("name")
        if not isinstance(name, str):
            raise _fail(source, where, f"needs name = \"…\"; registered {kind}s: {', '.join(registry.names(kind))}")
        rest = {k: v for k, v in table.items() if k not in ("name", "batch_sizes", "optional")
                and (kind != "task" or k not in _SCOPE_KEYS)}
        own_sizes = _own_batch_sizes(table, kind, f"{where} ('{name}')", source)
        optional = _optional(table, kind, f"{where} ('{name}')", source)
        scope = _task_scope(table, kind, f"{where} ('{name}')", source)
        try:
            if kind == "defense" and is_composed(name):
                expanded = _expand_composed(registry, name, rest)
            else:
                expanded = _expand(registry.get(kind, name).cls, kind, name, rest)
            configs.extend(dataclasses.replace(c, batch_sizes=own_sizes, optional=optional, scope=scope)
                           for c in expanded)
        except (ParamError, DefendaError) as exc:
            raise _fail(source, f"{where} ('{name}')", str(exc)) from None
    return configs


def _own_batch_sizes(table: dict[str, Any], kind: str, where: str, source: str) -> tuple[int, ...] | None:
    """An attack table's ``batch_sizes`` (batch sizes where they matter for that attack)."""
    if "batch_sizes" not in table:
        return None
    value = table["batch_sizes"]
    if kind != "attack":
        raise _fail(source, where, "batch_sizes can be set in [study] or in an [[attacks]] table only")
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value) or len(set(value)) != len(value):
        raise _fail(source, f"{where} key 'batch_sizes'", f"expected a non-empty list of distinct positive "
                                                          f"integers, got {value!r}")
    return tuple(value)


def _optional(table: dict[str, Any], kind: str, where: str, source: str) -> bool:
    """A task table's ``optional`` flag (run the task only when its data files are present)."""
    if "optional" not in table:
        return False
    if kind != "task":
        raise _fail(source, where, "optional can be set in a [task] / [[tasks]] table only")
    if not isinstance(table["optional"], bool):
        raise _fail(source, f"{where} key 'optional'", f"expected true or false, got {table['optional']!r}")
    return bool(table["optional"])


_SCOPE_KEYS = ("attacks", "defenses", "seeds")


def _task_scope(table: dict[str, Any], kind: str, where: str, source: str) -> TaskScope | None:
    """A task table's ``attacks``, ``defenses`` and ``seeds`` (checked against the study in :func:`_check_scopes`)."""
    if kind != "task" or not any(k in table for k in _SCOPE_KEYS):
        return None
    values: dict[str, Any] = {}
    for key in _SCOPE_KEYS:
        if key not in table:
            continue
        value = table[key]
        want = int if key == "seeds" else str
        if (not isinstance(value, list) or not value or len(set(value)) != len(value)
                or not all(isinstance(v, want) and not isinstance(v, bool) for v in value)
                or (key == "seeds" and min(value) < 0)):
            what = "non-negative integers" if key == "seeds" else "names of the study's " + key + " tables"
            raise _fail(source, f"{where} key '{key}'", f"expected a non-empty list of distinct {what}, got {value!r}")
        values[key] = tuple(value)
    return TaskScope(**values)


def _check_scopes(tasks: list[PluginConfig], attacks: list[PluginConfig], defenses: list[PluginConfig],
                  source: str) -> None:
    """Every name in a task's ``attacks`` / ``defenses`` must be one of the study's tables (a typo would
    silently drop the task's trials)."""
    known = {"attacks": {a.name for a in attacks}, "defenses": {d.name for d in defenses}}
    for task in tasks:
        if task.scope is None:
            continue
        for key in ("attacks", "defenses"):
            names = getattr(task.scope, key)
            missing = sorted(set(names or ()) - known[key])
            if missing:
                raise _fail(source, f"[[tasks]] ('{task.name}') key '{key}'",
                            f"{missing} not among the study's [[{key}]] ({', '.join(sorted(known[key]))})")


def _is_tuple_param(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(tp))


def _expand(cls: Any, kind: str, name: str, values: dict[str, Any]) -> list[PluginConfig]:
    """All parameter combinations of one plugin table (list values are sweeps)."""
    infos = {p.name: p for p in describe(cls.Params)}
    strength = strength_param(cls.Params) if kind == "defense" else None
    if strength is not None and strength.name not in values and getattr(cls, "default_sweep", None):
        values = {**values, strength.name: list(cls.default_sweep)}
    axes: dict[str, list[Any]] = {}
    for key, value in values.items():
        info = infos.get(key)
        is_sweep = isinstance(value, list) and (info is None or not _is_tuple_param(info.type)
                                                or (value and isinstance(value[0], list)))
        if is_sweep and not value:
            raise ParamError(f"parameter '{key}' is an empty sweep; give at least one value")
        axes[key] = value if is_sweep else [value]
    configs = []
    keys = list(axes)
    for combo in itertools.product(*axes.values()) if keys else [()]:
        params = build_params(cls.Params, dict(zip(keys, combo)), f"{kind} '{name}'")
        level = getattr(params, strength.name) if strength is not None else None
        configs.append(PluginConfig(kind, name, as_dict(params), float(level) if level is not None else None))
    return configs


def _expand_composed(registry: Registry, name: str, tables: dict[str, Any]) -> list[PluginConfig]:
    """Configurations of a composed defense: the product of its components' sweeps.

    The cell's strength is that of the last component declaring one.
    """
    parts = component_names(name)
    for key, value in tables.items():
        if key not in parts or not isinstance(value, dict):
            raise ParamError(f"in a composed defense, give each component's parameters as an inline table "
                             f"named after it, e.g. {parts[0]} = {{ ... }}; got key '{key}'")
    per_part = [_expand(registry.get("defense", p).cls, "defense", p, tables.get(p, {})) for p in parts]
    configs = []
    for combo in itertools.product(*per_part):
        strengths = [c.strength for c in combo if c.strength is not None]
        configs.append(PluginConfig("defense", name, {c.name: c.params for c in combo},
                                    strengths[-1] if strengths else None))
    return configs


def check_against_data(study: Study, registry: Registry) -> list[str]:
    """Errors that need the data: a missing data set, a batch larger than a task's train split.

    A task marked ``optional = true`` whose data cannot be loaded is removed from
    ``study.tasks`` instead; the returned notices say which and why.
    """
    from defenda.compose import make_defense
    from defenda.harness.services import load_task

    notices: list[str] = []
    for task in list(study.tasks):
        try:
            _, data = load_task(registry, task.name, task.params)
        except DefendaError as exc:
            if task.optional:
                study.tasks.remove(task)
                notices.append(f"task '{task.name}' skipped (optional = true): {exc}")
                continue
            raise StudyError(f"{study.source}: [task] '{task.name}': {exc}") from None
        n = len(data.train[0])
        if study.federations is not None:
            _check_partitions(study, task.name, data.train[1].numpy())
            continue
        for defense in study.defenses:
            chosen = make_defense(registry, defense.name, defense.params)
            wanted = {b for a in study.attacks for b in (a.batch_sizes or study.settings["batch_sizes"])}
            size = max(chosen.client_batch_size(b) for b in wanted)
            if size > n:
                raise StudyError(f"{study.source}: batch size {size} ({defense.label()}) is larger than task "
                                 f"'{task.name}' has training samples ({n}); use smaller batch_sizes")
    if not study.tasks:
        raise StudyError(f"{study.source}: no task left to run ({'; '.join(notices)})")
    return notices


def _check_partitions(study: Study, task: str, labels: Any) -> None:
    """Every federation's partition of ``task`` can be drawn for every seed (a clear error now,
    not one error row per training run later)."""
    from defenda.federation.partition import partition

    n = len(labels)
    for fs in study.federations or []:
        if fs.clients > n:
            raise StudyError(f"{study.source}: [federation] clients = {fs.clients} is more than task "
                             f"'{task}' has training samples ({n}); use fewer clients")
        for seed in study.settings["seeds"]:
            try:
                partition(labels, fs.clients, fs.partition, seed=seed, alpha=fs.alpha,
                          shards_per_client=fs.shards_per_client)
            except ValueError as exc:
                raise StudyError(f"{study.source}: [federation] on task '{task}', seed {seed}: {exc}") from None


def builtin_studies() -> dict[str, Path]:
    """The study files shipped with the package, by name (``default``, ``paper``)."""
    return {p.stem: p for p in sorted((Path(__file__).parents[1] / "studies").glob("*.toml"))}


def default_study_path() -> Path:
    """The built-in default study shipped with the package."""
    return builtin_studies()["default"]


def resolve_study(arg: str | None) -> Path:
    """A study argument: a file path, or the name of a built-in study (None: the default study)."""
    if arg is None:
        return default_study_path()
    path = Path(arg)
    builtin = builtin_studies()
    if not path.exists() and arg in builtin:
        return builtin[arg]
    if not path.exists():
        raise StudyError(f"{arg}: study file not found (built-in studies: {', '.join(builtin)})")
    return path
