"""Plugin loading: real installed distributions, broken ones, name clashes, switches."""

from __future__ import annotations

import pytest

from conftest import builtin_entry_points
from defenda.errors import PluginError, RegistrationError
from defenda.plugins import load_plugins

GOOD = """
from dataclasses import dataclass
from defenda import hookimpl, param
from defenda import Defense

@dataclass(frozen=True)
class P:
    scale: float = param(1.0, "multiply the update by this", strength="down")

class Scale(Defense):
    '''Scales the update.'''
    name = "scale-update"
    Params = P
    def transform(self, update, generator):
        return update.replace([t * self.params.scale for t in update.tensors])

@hookimpl
def defenda_register_defenses(register):
    register(Scale)
"""


def test_builtins_load_through_entry_points() -> None:
    plugins = load_plugins()
    assert {s.name for s in plugins.statuses if s.status == "loaded"} >= {"attacks", "defenses", "metrics", "tasks"}
    assert all(s.dist == "defenda" for s in plugins.statuses if s.name in {"attacks", "defenses"})
    assert "geiping" in plugins.registry.names("attack")
    assert {"none", "gaussian-noise"} <= set(plugins.registry.names("defense"))
    assert "digits" in plugins.registry.names("task")


def test_third_party_plugin_is_loaded_and_listed(make_dist) -> None:
    eps = make_dist("defenda-scale", "defenda_scale", GOOD, version="0.3.1")
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_scale")
    assert (st.status, st.dist, st.version) == ("loaded", "defenda-scale", "0.3.1")
    assert st.provides == {"defenses": ["scale-update"]}
    assert plugins.registry.get("defense", "scale-update").origin.dist == "defenda-scale"
    assert plugins.versions()["defenda-scale"] == "0.3.1"


def test_broken_import_is_reported_once_and_skipped(make_dist, capsys) -> None:
    eps = make_dist("defenda-broken", "defenda_broken", "import not_a_real_module_xyz\n", version="2.0")
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_broken")
    assert st.status == "failed"
    assert "ModuleNotFoundError" in st.error
    err = capsys.readouterr().err
    assert err.count("defenda_broken") >= 1 and len(err.strip().splitlines()) == 1
    assert "defenda-broken 2.0" in err and "DEFENDA_DISABLE_PLUGINS=defenda_broken" in err
    assert "DEFENDA_STRICT_PLUGINS=1" in err
    assert "geiping" in plugins.registry.names("attack")  # the others still load


def test_strict_mode_turns_a_broken_plugin_into_an_error(make_dist, monkeypatch) -> None:
    eps = make_dist("defenda-broken", "defenda_broken", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("DEFENDA_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="defenda_broken.*boom"):
        load_plugins(entry_points=builtin_entry_points() + eps)


def test_name_clash_names_both_plugins(make_dist, capsys) -> None:
    code = GOOD.replace('"scale-update"', '"gaussian-noise"')
    eps = make_dist("defenda-clash", "defenda_clash", code)
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_clash")
    assert st.status == "failed"
    assert "plugin 'defenda_clash'" in st.error and "plugin 'defenses' (defenda" in st.error
    assert "gaussian-noise" in st.error
    # The built-in keeps its name; the clashing plugin registered nothing.
    assert plugins.registry.get("defense", "gaussian-noise").origin.plugin == "defenses"


def test_hook_name_typo_is_incompatible(make_dist) -> None:
    code = GOOD.replace("def defenda_register_defenses", "def defenda_register_defences")
    eps = make_dist("defenda-typo", "defenda_typo", code)
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_typo")
    assert st.status == "incompatible"
    assert "defenda_register_defences" in st.error


def test_bad_hook_signature_is_incompatible(make_dist) -> None:
    code = GOOD.replace("def defenda_register_defenses(register)", "def defenda_register_defenses(register, device)")
    eps = make_dist("defenda-sig", "defenda_sig", code)
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    assert plugins.status("defenda_sig").status == "incompatible"
    assert "device" in plugins.status("defenda_sig").error


def test_requires_newer_defenda_is_refused(make_dist, capsys) -> None:
    eps = make_dist("defenda-future", "defenda_future", GOOD, requires=("defenda>=99",))
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_future")
    assert st.status == "incompatible"
    assert "defenda>=99" in st.error
    assert "scale-update" not in plugins.registry.names("defense")
    assert "pip install -U defenda-future" in capsys.readouterr().err


def test_disable_and_allow_lists(make_dist, monkeypatch) -> None:
    eps = make_dist("defenda-scale", "defenda_scale", GOOD)
    monkeypatch.setenv("DEFENDA_DISABLE_PLUGINS", "defenda_scale")
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    assert plugins.status("defenda_scale").status == "blocked"
    assert "scale-update" not in plugins.registry.names("defense")
    monkeypatch.delenv("DEFENDA_DISABLE_PLUGINS")
    monkeypatch.setenv("DEFENDA_LOAD_PLUGINS", "defenses,defenda_scale")
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    assert plugins.status("attacks").status == "blocked"
    assert plugins.status("defenda_scale").status == "loaded"


def test_invalid_params_declaration_names_the_plugin(make_dist) -> None:
    code = GOOD.replace('param(1.0, "multiply the update by this", strength="down")', "1.0")
    eps = make_dist("defenda-nohelp", "defenda_nohelp", code)
    plugins = load_plugins(entry_points=builtin_entry_points() + eps)
    st = plugins.status("defenda_nohelp")
    assert st.status == "failed"
    assert "plugin 'defenda_nohelp' (defenda-nohelp 0.1.0)" in st.error and "help" in st.error


def test_unknown_parameter_lists_valid_names() -> None:
    from defenda.errors import ParamError

    cls = load_plugins().registry.get("defense", "gaussian-noise").cls
    with pytest.raises(ParamError, match=r"unknown parameter 'sdt'.*Did you mean 'std'.*Valid parameters: std, clip"):
        cls(sdt=0.1)
    with pytest.raises(ParamError, match="must be a number"):
        cls(std="loud")


def test_unknown_plugin_name_suggests_close_match() -> None:
    with pytest.raises(RegistrationError, match="Did you mean 'geiping'"):
        load_plugins().registry.get("attack", "gieping")


def test_observer_hook_errors_do_not_stop(capsys) -> None:
    import types

    from defenda import hookimpl

    seen = []
    mod = types.ModuleType("observer")

    @hookimpl
    def defenda_trial_finished(trial, result):  # noqa: ANN001
        seen.append(result["status"])
        raise ValueError("tracker down")

    mod.defenda_trial_finished = defenda_trial_finished
    plugins = load_plugins(extra=[("observer", mod)])
    plugins.notify_trial_finished({"key": "k"}, {"status": "ok"})
    assert seen == ["ok"]
    assert "tracker down" in capsys.readouterr().err


def test_third_party_metric_and_task_are_used_by_a_study(tmp_path) -> None:
    """A plugin adds a metric (stored in the row's extra JSON) and a task; a study uses both."""
    import json
    import sqlite3
    import types
    from dataclasses import dataclass

    from defenda import Metric, Task, hookimpl, param
    from defenda.harness.runner import run_study
    from defenda.harness.study import parse_study

    class L1(Metric):
        """Mean absolute error in model space."""

        name = "l1"
        columns = ("l1",)

        def compute(self, x, y, recon, data):  # noqa: ANN001
            return {"l1": float((x - recon.inputs).abs().mean())}

    @dataclass(frozen=True)
    class SmallParams:
        samples: int = param(300, "how many digits to keep")

    class SmallDigits(Task):
        """The first N embedded digits."""

        name = "small-digits"
        Params = SmallParams

        def load(self):  # noqa: ANN201
            from defenda.data import load_digits_task

            return load_digits_task(max_samples=self.params.samples)

        def build_model(self, data):  # noqa: ANN001, ANN201
            from defenda.models import SmallCNN

            return SmallCNN(1, 8, data.num_classes)

    mod = types.ModuleType("extras")

    @hookimpl
    def defenda_register_metrics(register):  # noqa: ANN001
        register(L1)

    @hookimpl
    def defenda_register_tasks(register):  # noqa: ANN001
        register(SmallDigits)

    mod.defenda_register_metrics = defenda_register_metrics
    mod.defenda_register_tasks = defenda_register_tasks
    plugins = load_plugins(extra=[("extras", mod)])
    assert plugins.status("extras").provides == {"metrics": ["l1"], "tasks": ["small-digits"]}
    study = parse_study({"study": {"seeds": [0], "rounds": 1}, "task": {"name": "small-digits", "samples": 200},
                         "attacks": [{"name": "geiping", "iterations": 3}]}, plugins.registry)
    run_study(study, tmp_path, progress=False, plugins=plugins)
    row = sqlite3.connect(tmp_path / "results.sqlite").execute("SELECT status, task, extra FROM trials").fetchone()
    assert row[0] == "ok" and row[1] == "small-digits"
    assert json.loads(row[2])["l1"] > 0
