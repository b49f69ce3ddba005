# ruff: noqa: F811 - the fixtures are imported from defenda.testing and then requested by name
"""``defenda.testing`` (the plugin authors' pytest helper) and the third-party route end to end.

The second half installs real packages with pip into a temporary ``--target``
directory — the example plugin ``plugins/soteria`` and a set of broken plugins —
and runs ``defenda`` in subprocesses that see them through ``PYTHONPATH``:
listing, a study naming the example's defense, the one-line messages for each
broken package, strict mode, the allow/block lists, and uninstalling.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import json
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from defenda import Attack, Defense, Metric, Reconstruction, hookimpl, param
from defenda.errors import PluginError
from defenda.plugins import get_plugins
from defenda.testing import (  # the fixtures are imported here; test_opt_in checks `pytest_plugins`
    assert_installed,
    builtin_plugins,
    check_attack,
    check_defense,
    check_metric,
    defenda_cli,  # noqa: F401
    defenda_plugins,  # noqa: F401
    defenda_pm,  # noqa: F401
    make_tiny_case,
    register_plugin,  # noqa: F401
    registered,
    run_cli,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "plugins" / "soteria"
BUILTINS = builtin_plugins()


SCALE_MODULE = """
    import dataclasses
    from defenda import Defense, hookimpl, param

    class Scale(Defense):
        \"\"\"Scales the update by a constant.\"\"\"

        name = "scale-update"

        @dataclasses.dataclass(frozen=True)
        class Params:
            scale: float = param(1.0, "multiply the update by this", strength="down")

        def transform(self, update, generator):
            return update.replace([t * self.params.scale for t in update.tensors])

    @hookimpl
    def defenda_register_defenses(register):
        register(Scale)
"""


class Scale(Defense):
    """Scales the update by a constant."""

    name = "scale-update"

    @dataclasses.dataclass(frozen=True)
    class Params:
        scale: float = param(1.0, "multiply the update by this", strength="down")

    def transform(self, update, generator):  # noqa: ANN001, ANN201
        return update.replace([t * self.params.scale for t in update.tensors])


# --------------------------------------------------------------------------- fixtures and registration


def test_defenda_plugins_holds_only_the_builtins(defenda_plugins, defenda_pm, make_dist) -> None:
    make_dist("defenda-scale", "defenda_scale", "from defenda import hookimpl\n")
    assert "defenda_scale" in {ep.name for ep in md.entry_points(group="defenda")}
    assert {s.dist for s in defenda_plugins.statuses} == {"defenda"}
    assert all(s.status == "loaded" for s in defenda_plugins.statuses)
    assert "geiping" in defenda_plugins.registry.names("attack")
    assert defenda_pm is defenda_plugins.pm and hasattr(defenda_pm.hook, "defenda_register_defenses")


def test_defenda_plugins_ignores_the_environment_switches(defenda_plugins, monkeypatch) -> None:
    monkeypatch.setenv("DEFENDA_LOAD_PLUGINS", "")
    assert "none" in builtin_plugins().registry.names("defense")


def test_register_plugin_makes_a_class_visible_to_studies_and_the_cli(register_plugin, defenda_cli) -> None:
    plugins = register_plugin(Scale)
    assert get_plugins() is plugins
    assert plugins.registry.get("defense", "scale-update").cls is Scale
    assert "none" in plugins.registry.names("defense")  # the built-ins are there too
    listed = {d["name"] for d in defenda_cli("defenses", "--json").assert_success().json()}
    assert "scale-update" in listed


def test_register_plugin_accepts_a_module_and_is_strict(register_plugin) -> None:
    mod = types.ModuleType("typo")

    @hookimpl
    def defenda_register_defences(register):  # noqa: ANN001 - the typo is the point
        register(Scale)

    mod.defenda_register_defences = defenda_register_defences
    with pytest.raises(PluginError, match="plugin 'typo'.*defenda_register_defences"):
        register_plugin(mod)


def test_registered_restores_the_previous_plugins() -> None:
    before = get_plugins()
    with registered(Scale, name="scale") as plugins:
        assert get_plugins() is plugins and plugins.status("scale").provides == {"defenses": ["scale-update"]}
    assert get_plugins() is before


PLUGIN_TEST = """
import defenda_scale
from defenda.testing import check_defense

def test_contract():
    check_defense(defenda_scale.Scale, kinds=("gradient",))

def test_registered(register_plugin, defenda_cli):
    register_plugin(defenda_scale, "scale")
    defenda_cli("defenses").assert_success().assert_output_contains("scale-update")
"""


def test_opt_in_pytest_plugin(tmp_path: Path) -> None:
    """`pytest_plugins = ["defenda.testing"]` in a plugin's conftest gives its tests the fixtures;
    without it, pytest runs know nothing about defenda (nothing is auto-loaded)."""
    (tmp_path / "defenda_scale.py").write_text(textwrap.dedent(SCALE_MODULE))
    (tmp_path / "test_scale.py").write_text(PLUGIN_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings = error\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)]
    bare = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert bare.returncode == 1 and "fixture 'register_plugin' not found" in bare.stdout, bare.stdout
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["defenda.testing"]\n')
    enabled = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert enabled.returncode == 0 and "2 passed" in enabled.stdout, enabled.stdout + enabled.stderr


def test_tiny_case_is_small_deterministic_and_cpu() -> None:
    a, b = make_tiny_case(), make_tiny_case()
    assert tuple(a.x.shape) == (2, 3, 8, 8) and a.data.kind == "image" and a.x.device.type == "cpu"
    assert torch.equal(a.x, b.x) and all(torch.equal(p, q) for p, q in zip(a.model.parameters(),
                                                                         b.model.parameters()))
    tab = make_tiny_case("tabular", batch_size=3)
    assert tuple(tab.x.shape) == (3, 10) and tab.knowledge(["labels"]).labels.tolist() == tab.y.tolist()
    with pytest.raises(ValueError, match="kind"):
        make_tiny_case("audio")


# --------------------------------------------------------------------------- contract checks: built-ins pass


@pytest.mark.parametrize("name", BUILTINS.registry.names("defense"))
def test_builtin_defenses_pass_check_defense(name: str) -> None:
    update = check_defense(BUILTINS.registry.get("defense", name).cls)
    assert len(update.tensors) == len(list(make_tiny_case().model.parameters()))


@pytest.mark.filterwarnings("ignore::defenda.metrics.LPIPSUnavailableWarning")
@pytest.mark.parametrize("name", BUILTINS.registry.names("metric"))
def test_builtin_metrics_pass_check_metric(name: str) -> None:
    check_metric(BUILTINS.registry.get("metric", name).cls)


def test_geiping_passes_check_attack() -> None:
    rec = check_attack(BUILTINS.registry.get("attack", "geiping").cls, {"iterations": 3})
    assert tuple(rec.inputs.shape) == (2, 3, 8, 8)


# --------------------------------------------------------------------------- contract checks: broken plugins fail


class _Broken(Defense):
    """A defense that breaks one rule (subclasses pick which)."""

    name = "broken"

    @dataclasses.dataclass(frozen=True)
    class Params:
        level: float = param(0.0, "how broken", strength="up")


class TouchesModel(_Broken):
    """Changes the caller's weights."""

    def client_update(self, model, x, y, settings, generator=None):  # noqa: ANN001, ANN201
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return super().client_update(model, x, y, settings, generator)


class Flaky(_Broken):
    """Different every call."""

    calls = 0

    def transform(self, update, generator):  # noqa: ANN001, ANN201
        type(self).calls += 1
        return update.replace([t + type(self).calls for t in update.tensors])


class WrongShapes(_Broken):
    """Drops the last tensor."""

    def transform(self, update, generator):  # noqa: ANN001, ANN201
        return update.replace(update.tensors[:-1])


class BadSweep(_Broken):
    """Sweeps a value its Params reject."""

    default_sweep = (0.5, -1.0)

    @dataclasses.dataclass(frozen=True)
    class Params:
        level: float = param(0.0, "how broken", strength="up")

        def __post_init__(self) -> None:
            if self.level < 0:
                raise ValueError("level must be >= 0")


class HeavyWeights(_Broken):
    """Weights that sum to more than one."""

    def aggregation_weights(self, sizes):  # noqa: ANN001, ANN201
        return [1.0 for _ in sizes]


class BadSecureSum(_Broken):
    """Hides client updates but decodes an aggregate with a tensor missing."""

    hides_client_updates = True

    def secure_aggregate(self, updates, weights, generator=None):  # noqa: ANN001, ANN201
        return updates[0].replace(updates[0].tensors[:-1])


class NoStrength(Defense):
    """Declares no strength."""

    name = "no-strength"

    @dataclasses.dataclass(frozen=True)
    class Params:
        level: float = param(0.0, "not marked as strength")


@pytest.mark.parametrize("cls, message", [
    (TouchesModel, "modified the model's weights"),
    (Flaky, "not deterministic"),
    (WrongShapes, "update tensors do not match the model's parameters"),
    (BadSweep, "default_sweep value -1.0 is not a valid level"),
    (NoStrength, "declares no strength field"),
    (HeavyWeights, "aggregation_weights"),
    (BadSecureSum, "secure_aggregate"),
])
def test_check_defense_reports_broken_defenses(cls: type, message: str) -> None:
    with pytest.raises(AssertionError, match=message) as info:
        check_defense(cls, kinds=("gradient",))
    assert str(info.value).startswith(f"defense '{cls.__name__}' breaks the defenda plugin contract")


class HalfBatch(Attack):
    """Returns samples of the wrong shape."""

    name = "half-batch"

    def reconstruct(self, update, model, knowledge):  # noqa: ANN001, ANN201
        return Reconstruction(torch.zeros(1, 3, 4, 4))


class Picky(Attack):
    """Declines every model."""

    name = "picky"

    def check(self, model, data, knowledge):  # noqa: ANN001, ANN201
        return "needs a first linear layer"

    def reconstruct(self, update, model, knowledge):  # noqa: ANN001, ANN201
        raise AssertionError("not reached")


def test_check_attack_reports_broken_attacks() -> None:
    with pytest.raises(AssertionError, match=r"reconstruction has sample shape \(3, 4, 4\), expected \(3, 8, 8\)"):
        check_attack(HalfBatch)
    with pytest.raises(AssertionError, match="declined the tiny image case: 'needs a first linear layer'"):
        check_attack(Picky)


class ExtraColumn(Metric):
    """Returns a column it did not declare, and NaN."""

    name = "extra-column"
    columns = ("score",)

    def compute(self, x, y, recon, data):  # noqa: ANN001, ANN201
        return {"score": float("nan"), "other": 1.0}


def test_check_metric_reports_broken_metrics() -> None:
    with pytest.raises(AssertionError) as info:
        check_metric(ExtraColumn)
    assert "declared columns are ['score']" in str(info.value)
    assert "compute()['score'] = nan" in str(info.value)


# --------------------------------------------------------------------------- run_cli


def test_run_cli_in_process_and_in_a_subprocess() -> None:
    run_cli("--version").assert_success().assert_output_contains("defenda 0.1.0")
    run_cli("defenses", "--bogus").assert_failure(2).assert_output_contains("unrecognized", stream="err")
    run_cli("run", "missing.toml").assert_failure(2).assert_output_contains("study file not found", stream="err")
    names = {p["name"] for p in run_cli("plugins", "--json", subprocess_=True).assert_success().json()}
    assert {"attacks", "defenses", "metrics", "tasks"} <= names
    with pytest.raises(AssertionError, match="exited 2"):
        run_cli("run", "missing.toml").assert_success()


# --------------------------------------------------------------------------- real packages installed with pip


def _pip_install(target: Path, *projects: Path) -> None:
    """``pip install --target`` without touching the index when this interpreter can build offline."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target)]
    try:
        from packaging.version import Version

        if Version(md.version("setuptools")) >= Version("70.1"):  # builds wheels without the 'wheel' package
            cmd += ["--no-build-isolation", "--no-index"]
    except md.PackageNotFoundError:
        pass
    proc = subprocess.run([*cmd, *map(str, projects)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _project(root: Path, dist: str, version: str, code: str, *, ep: str, requires: tuple[str, ...] = ()) -> Path:
    module = dist.replace("-", "_")
    path = root / dist
    (path / module).mkdir(parents=True)
    (path / module / "__init__.py").write_text(textwrap.dedent(code))
    deps = ", ".join(f'"{r}"' for r in requires)
    (path / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{dist}"
        version = "{version}"
        dependencies = [{deps}]
        [project.entry-points.defenda]
        {ep} = "{module}"
        [tool.setuptools]
        packages = ["{module}"]
        """))
    return path


MIRROR = """
from dataclasses import dataclass
from defenda import Defense, hookimpl, param

class Mirror(Defense):
    '''Negates the update.'''
    name = "mirror"
    @dataclass(frozen=True)
    class Params:
        gain: float = param(1.0, "factor", strength="down")
    def transform(self, update, generator):
        return update.replace([-t * self.params.gain for t in update.tensors])

@hookimpl
def defenda_register_defenses(register):
    register(Mirror)
"""

BROKEN = {  # dist: (version, entry-point name, code, Requires-Dist)
    "defenda-importfail": ("1.0.0", "importfail", "import not_a_real_module_xyz\n", ()),
    "defenda-typo": ("1.1.0", "typo", MIRROR.replace("defenda_register_defenses", "defenda_register_defences"), ()),
    "defenda-badsig": ("1.2.0", "badsig", MIRROR.replace("(register):", "(register, device):"), ()),
    "defenda-clash-a": ("0.1.0", "clash_a", MIRROR, ()),
    "defenda-clash-b": ("0.2.0", "clash_b", MIRROR, ()),
    "defenda-future": ("2.0.0", "future", MIRROR.replace('"mirror"', '"future-mirror"'), ("defenda>=99",)),
}
PROBLEMS = ("importfail", "typo", "badsig", "clash_b", "future")

STUDY = """
[study]
name = "third-party"
seeds = [0]
rounds = 2
client_batch_size = 8
[task]
name = "digits"
[[attacks]]
name = "geiping"
iterations = 5
[[defenses]]
name = "none"
[[defenses]]
name = "soteria"
fraction = 0.5
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the example plugin and the broken packages, installed by pip."""
    src = tmp_path_factory.mktemp("src")
    target = tmp_path_factory.mktemp("site")
    example = src / "soteria"
    shutil.copytree(EXAMPLE, example, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__",
                                                                    ".pytest_cache", "tests", "conftest.py"))
    projects = [example] + [_project(src, dist, v, code, ep=ep, requires=req)
                            for dist, (v, ep, code, req) in BROKEN.items()]
    _pip_install(target, *projects)
    return target


def _plugins_json(site: Path, **env: str) -> tuple[dict[str, dict], str]:
    outcome = run_cli("plugins", "--json", env={"PYTHONPATH": str(site), **env}, subprocess_=True).assert_success()
    return {p["name"]: p for p in outcome.json()}, outcome.err


def test_installed_example_plugin_is_listed(site: Path) -> None:
    [entry] = assert_installed("defenda-soteria", {"defenses": ["soteria"]}, path=site)
    assert entry["version"] == "0.1.0" and entry["hooks"] == ["defenda_register_defenses"]
    assert entry["module"] == "defenda_soteria" and not entry["builtin"]


def test_study_naming_the_installed_defense_runs_and_reports_it(site: Path, tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    out = tmp_path / "out"
    run = run_cli("run", str(study), "--out", str(out), "--no-progress", "--report", str(tmp_path / "report"),
                  env={"PYTHONPATH": str(site), "DEFENDA_DISABLE_PLUGINS": ",".join(PROBLEMS)}, subprocess_=True)
    run.assert_success().assert_output_contains("2 ok", stream="err")
    rows = sqlite3.connect(out / "results.sqlite").execute(
        "SELECT defense, status, psnr, versions FROM trials ORDER BY defense").fetchall()
    assert [(d, s) for d, s, *_ in rows] == [("none", "ok"), ("soteria", "ok")]
    assert json.loads(rows[1][3])["defenda-soteria"] == "0.1.0"
    assert "soteria" in (tmp_path / "report" / "index.md").read_text()


def test_broken_packages_are_reported_once_and_the_rest_load(site: Path) -> None:
    plugins, err = _plugins_json(site)
    status = {name: p["status"] for name, p in plugins.items()}
    assert status["soteria"] == status["clash_a"] == status["attacks"] == "loaded"
    assert {n: status[n] for n in PROBLEMS} == {"importfail": "failed", "typo": "incompatible",
                                                "badsig": "incompatible", "clash_b": "failed",
                                                "future": "incompatible"}
    lines = err.strip().splitlines()
    assert len(lines) == len(PROBLEMS), err
    by_plugin = {name: next(line for line in lines if f"plugin '{name}' " in line) for name in PROBLEMS}
    for name in PROBLEMS:
        dist = f"defenda-{name.replace('_', '-')}"
        version = BROKEN[dist][0]
        line = by_plugin[name]
        assert f"({dist} {version})" in line, line  # which plugin, distribution and version
        assert f"DEFENDA_DISABLE_PLUGINS={name}" in line and "DEFENDA_STRICT_PLUGINS=1" in line, line
    assert "ModuleNotFoundError: No module named 'not_a_real_module_xyz'" in by_plugin["importfail"]
    assert "pip install -U defenda-importfail" in by_plugin["importfail"]
    assert "defenda_register_defences" in by_plugin["typo"] and "Fix the hook name" in by_plugin["typo"]
    assert "device" in by_plugin["badsig"]
    assert "plugin 'clash_a' (defenda-clash-a 0.1.0)" in by_plugin["clash_b"] and "'mirror'" in by_plugin["clash_b"]
    assert "requires defenda>=99" in by_plugin["future"] and "pip install -U defenda-future" in by_plugin["future"]
    assert plugins["clash_a"]["provides"] == {"defenses": ["mirror"]}
    assert "future-mirror" not in json.dumps(plugins)


def test_strict_mode_turns_the_first_broken_package_into_an_error(site: Path) -> None:
    outcome = run_cli("plugins", "--json", env={"PYTHONPATH": str(site), "DEFENDA_STRICT_PLUGINS": "1"},
                      subprocess_=True).assert_failure(2)
    assert outcome.out == ""
    [line] = outcome.err.strip().splitlines()
    assert line.startswith("defenda: error: defenda: plugin 'badsig' (defenda-badsig 1.2.0)")


def test_disable_and_load_lists_with_installed_packages(site: Path) -> None:
    plugins, err = _plugins_json(site, DEFENDA_DISABLE_PLUGINS=",".join(PROBLEMS))
    assert err == ""
    assert {n: plugins[n]["status"] for n in PROBLEMS} == dict.fromkeys(PROBLEMS, "blocked")
    assert plugins["soteria"]["status"] == "loaded"
    plugins, err = _plugins_json(site, DEFENDA_LOAD_PLUGINS="attacks,defenses,metrics,tasks,soteria")
    assert err == "" and plugins["soteria"]["status"] == "loaded" and plugins["clash_a"]["status"] == "blocked"
    plugins, err = _plugins_json(site, DEFENDA_LOAD_PLUGINS="attacks,defenses,metrics,tasks")
    assert err == "" and plugins["soteria"]["status"] == "blocked"


def test_uninstalled_plugin_is_gone(site: Path, tmp_path: Path) -> None:
    gone = tmp_path / "site"
    shutil.copytree(site, gone)
    record = next(gone.glob("defenda_soteria-*.dist-info")) / "RECORD"
    for line in record.read_text().splitlines():  # what `pip uninstall` removes
        (gone / line.split(",")[0]).unlink(missing_ok=True)
    for folder in sorted({p for p in gone.rglob("*") if p.is_dir()}, key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
    assert not list(gone.glob("defenda_soteria*"))
    plugins, _ = _plugins_json(gone, DEFENDA_DISABLE_PLUGINS=",".join(PROBLEMS))
    assert "soteria" not in plugins
    study = tmp_path / "study.toml"
    study.write_text(STUDY)
    run_cli("run", str(study), "--out", str(tmp_path / "out"), env={"PYTHONPATH": str(gone)},
            subprocess_=True).assert_failure(2).assert_output_contains("unknown defense 'soteria'", stream="err")
