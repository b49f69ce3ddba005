"""Reliability: studies survive SIGKILL and Ctrl-C, hostile plugins are isolated, bad input never crashes.

The kill loop runs ``DEFENDA_KILL_LOOPS`` kills (default 10; the longer variant:
``DEFENDA_KILL_LOOPS=50 pytest tests/test_reliability.py -k kill``).
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from defenda.errors import StudyError
from defenda.harness.runner import run_study
from defenda.harness.study import load_study, parse_study
from defenda.plugins import load_plugins

HOSTILE = '''
import time
from dataclasses import dataclass
import torch
from defenda import hookimpl, param
from defenda import Attack, Defense, Reconstruction

class Hang(Attack):
    """Never returns."""
    name = "hang"
    def reconstruct(self, update, model, knowledge):
        time.sleep(3600)

class Hog(Attack):
    """Allocates far too much memory."""
    name = "hog"
    def reconstruct(self, update, model, knowledge):
        x = torch.ones(int(64 * 2**30), dtype=torch.uint8)
        return Reconstruction(x[:1].float())

class NaNs(Attack):
    """Returns NaN."""
    name = "nans"
    def reconstruct(self, update, model, knowledge):
        return Reconstruction(torch.full((1, *knowledge.input_shape), float("nan")))

class Infs(Attack):
    """Returns inf."""
    name = "infs"
    def reconstruct(self, update, model, knowledge):
        return Reconstruction(torch.full((1, *knowledge.input_shape), float("inf")))

class Nothing(Attack):
    """Returns None."""
    name = "nothing"
    def reconstruct(self, update, model, knowledge):
        return None

class Dies(Attack):
    """Kills its own process."""
    name = "dies"
    def reconstruct(self, update, model, knowledge):
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)

@dataclass(frozen=True)
class P:
    level: float = param(1.0, "unused", strength="up")

class BadStructure(Defense):
    """Drops a tensor from the update."""
    name = "bad-structure"
    Params = P
    def transform(self, update, generator):
        return update.replace(update.tensors[:-1])

@hookimpl
def defenda_register_attacks(register):
    for cls in (Hang, Hog, NaNs, Infs, Nothing, Dies):
        register(cls)

@hookimpl
def defenda_register_defenses(register):
    register(BadStructure)
'''


def _rows(out: Path) -> list[dict]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM trials")]


def test_hostile_plugins_become_error_rows(make_dist, tmp_path: Path) -> None:
    make_dist("defenda-hostile", "defenda_hostile", HOSTILE, version="6.6.6")
    plugins = load_plugins()
    assert plugins.status("defenda_hostile").status == "loaded"
    attacks = [{"name": n} for n in ("hang", "hog", "nans", "infs", "nothing", "dies")]
    attacks.append({"name": "geiping", "iterations": 3})
    study = parse_study({
        "study": {"seeds": [0], "rounds": 1, "timeout": 20, "memory_limit_gb": 4},
        "task": {"name": "digits"}, "attacks": attacks,
        "defenses": [{"name": "none"}, {"name": "bad-structure", "level": 1.0}],
    }, plugins.registry)
    counts = run_study(study, tmp_path, progress=False, plugins=plugins)
    rows = {(r["attack"], r["defense"]): r for r in _rows(tmp_path)}
    assert len(rows) == 14 and counts["ok"] == 1
    assert rows[("geiping", "none")]["status"] == "ok"  # the one good cell completed
    expect = {
        "hang": "timed out after 20 s", "hog": "can't allocate memory", "nans": "NaN or inf",
        "infs": "NaN or inf", "nothing": "not a Reconstruction", "dies": "worker process died",
    }
    for attack, text in expect.items():
        row = rows[(attack, "none")]
        assert row["status"] == "error" and text in row["reason"], (attack, row["reason"])
        assert row["plugin"] == "defenda_hostile", (attack, row["plugin"])
        assert "\n" not in row["reason"]
    for attack in expect:  # the malformed update is caught before any attack runs
        row = rows[(attack, "bad-structure")]
        assert row["status"] == "error" and "do not match the model's parameters" in row["reason"]
        assert row["plugin"] == "defenda_hostile"


KILL_STUDY = """
[study]
name = "kills"
seeds = [{seeds}]
rounds = 1
client_batch_size = 8
[task]
name = "digits"
[[attacks]]
name = "geiping"
iterations = 2
[[defenses]]
name = "none"
[[defenses]]
name = "gaussian-noise"
std = 0.01
"""


def _count(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(db, timeout=5)
        n = con.execute("SELECT (SELECT count(*) FROM trials) + (SELECT count(*) FROM utility)").fetchone()[0]
        con.close()
        return int(n)
    except sqlite3.OperationalError:
        return 0


def _run_cmd(study: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "defenda.cli", "run", str(study), "--out", str(out), "--no-progress"]


def test_sigkill_at_random_points_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    kills_wanted = int(os.environ.get("DEFENDA_KILL_LOOPS", "10"))
    n_seeds = 6 * kills_wanted
    study = tmp_path / "kills.toml"
    # 60 iterations (~0.1 s a trial): a run writes a few rows before its kill, so the study
    # outlasts the wanted number of kills even on a quiet machine
    study.write_text(KILL_STUDY.format(seeds=", ".join(str(i) for i in range(n_seeds))).replace(
        "iterations = 2", "iterations = 60"))
    out = tmp_path / "out"
    db = out / "results.sqlite"
    rng = random.Random(1234)
    kills = 0
    for _ in range(kills_wanted * 3):
        before = _count(db)
        proc = subprocess.Popen(_run_cmd(study, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while _count(db) <= before and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)  # wait until this run has written something
        time.sleep(rng.uniform(0.0, 0.4))  # then kill at a random point (often mid-trial or mid-write)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
        if kills >= kills_wanted or proc.returncode == 0:
            break
    assert kills >= kills_wanted
    done = subprocess.run(_run_cmd(study, out), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = _rows(out)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 2 * n_seeds  # every trial exactly once
    assert all(r["status"] == "ok" and r["psnr"] is not None and r["test_acc"] is not None for r in rows)
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert con.execute("SELECT count(*) FROM utility").fetchone()[0] == 2 * n_seeds
    leftovers = [p for p in (out / "recon").iterdir() if p.name.startswith(".")]
    assert all(p.name.endswith(".tmp.npz") for p in leftovers)  # only half-written temporaries, never read


def test_ctrl_c_prints_how_to_resume_and_exits_nonzero(tmp_path: Path) -> None:
    study = tmp_path / "kills.toml"
    # 300 iterations per trial (~1 s): the study is still running when the signal arrives, however
    # late a loaded machine lets this test see the third row (with 2 iterations it could finish first)
    study.write_text(KILL_STUDY.format(seeds=", ".join(str(i) for i in range(40))).replace(
        "iterations = 2", "iterations = 300"))
    out = tmp_path / "out"
    # A background job of a non-interactive shell (nohup, `&`, some CI runners) inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default
    # disposition, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(_run_cmd(study, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while _count(out / "results.sqlite") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted" in err and "same command again to resume" in err
    assert "Traceback" not in err
    con = sqlite3.connect(out / "results.sqlite")
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_batch_larger_than_dataset_and_bad_names_are_clear(tmp_path: Path) -> None:
    plugins = load_plugins()
    study = parse_study({"study": {"batch_sizes": [5000]}, "task": {"name": "digits"},
                         "attacks": [{"name": "geiping"}]}, plugins.registry)
    with pytest.raises(StudyError, match="batch size 5000 .* larger than task 'digits' has training samples"):
        run_study(study, tmp_path, progress=False, plugins=plugins)
    for name in ("../escape", "/abs", ".hidden", "a/b"):
        with pytest.raises(StudyError, match="key 'name'"):
            parse_study({"study": {"name": name}, "task": {"name": "digits"}, "attacks": [{"name": "geiping"}]},
                        plugins.registry)


def test_checkpoints_are_only_loaded_with_weights_only() -> None:
    """Every torch.load in the code base passes weights_only=True (a malicious pickle cannot run)."""
    import re

    root = Path(__file__).parents[1]
    sources = [p for d in ("defenda", "plugins") for p in (root / d).rglob("*.py")]
    calls = [(p, m) for p in sources for m in re.finditer(r"torch\.load\(([^)]*)\)", p.read_text())]
    assert all("weights_only=True" in m.group(1) for _, m in calls), [str(p) for p, _ in calls]


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    import pickle

    import torch

    class Evil:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weight": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    assert not (tmp_path / "pwned").exists()


# -- fuzzing the study loader ---------------------------------------------------------------------

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                       max_leaves=12)
_keys = st.sampled_from(["name", "seeds", "batch_sizes", "rounds", "lr", "update", "server", "knowledge",
                         "iterations", "std", "model", "timeout", "clip", "x"])
_plugin_table = st.dictionaries(_keys, _values, max_size=4).map(
    lambda d: d if "name" in d else {**d, "name": "geiping"})
_studies = st.fixed_dictionaries({}, optional={
    "study": st.dictionaries(_keys, _values, max_size=5),
    "task": st.one_of(_values, st.just({"name": "digits"})),
    "attacks": st.one_of(_values, st.lists(_plugin_table, max_size=2)),
    "defenses": st.one_of(_values, st.lists(_plugin_table.map(
        lambda d: {**d, "name": random.Random(len(d)).choice(["none", "gaussian-noise", "x"])}), max_size=2)),
    "junk": _values,
})


@pytest.fixture(scope="module")
def registry():
    return load_plugins().registry


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=_studies)
def test_fuzzed_study_dicts_raise_only_study_errors(registry, raw) -> None:
    try:
        study = parse_study(raw, registry)
    except StudyError as exc:
        assert "\n" not in str(exc)
        return
    study.trials()  # a study that parses expands


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.sampled_from(list('[]{}="\n ,.#abcdefghinorstuy0123456789-_')), max_size=120))
def test_fuzzed_toml_text_raises_only_study_errors(registry, tmp_path_factory, text) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "s.toml"
    path.write_text(text)
    try:
        load_study(path, registry)
    except StudyError:
        pass
