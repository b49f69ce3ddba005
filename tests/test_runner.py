"""The runner and store: rows, resume after a crash, error and skipped rows, observers, reports."""

from __future__ import annotations

import copy
import sqlite3
import types
from pathlib import Path

import pytest
import torch

from conftest import TINY_STUDY
from defenda import Attack, Reconstruction, Requirements, hookimpl
from defenda.errors import StoreError
from defenda.harness.runner import run_study
from defenda.harness.store import Store
from defenda.harness.study import parse_study
from defenda.plugins import load_plugins


class Crash(BaseException):
    """Stands in for a SIGKILL/Ctrl-C arriving between two trials."""


def _study(plugins, **changes):
    raw = copy.deepcopy(TINY_STUDY)
    for section, value in changes.items():
        raw[section] = value
    return parse_study(raw, plugins.registry)


def _rows(out: Path) -> list[dict]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) for r in db.execute("SELECT * FROM trials")]


def test_study_writes_one_row_per_trial(tmp_path: Path) -> None:
    plugins = load_plugins()
    study = _study(plugins)
    counts = run_study(study, tmp_path, progress=False, plugins=plugins)
    assert counts["ok"] == 6
    rows = _rows(tmp_path)
    assert len(rows) == 6
    for r in rows:
        assert r["status"] == "ok" and r["psnr"] is not None and r["ssim"] is not None
        assert 0.0 <= r["test_acc"] <= 1.0 and r["attack_seconds"] > 0
        assert r["label_acc"] == 1.0  # iDLG recovers the label of a single image exactly
        assert '"defenda"' in r["versions"]
        assert (tmp_path / "recon" / f"{r['key']}.npz").exists()
    # utility computed once per (task, defense, strength, seed), not once per attack
    util = sqlite3.connect(tmp_path / "results.sqlite").execute("SELECT count(*) FROM utility").fetchone()[0]
    assert util == 6


def test_resume_after_crash_loses_nothing_and_duplicates_nothing(tmp_path: Path) -> None:
    finished = []
    mod = types.ModuleType("crasher")

    @hookimpl
    def defenda_trial_finished(trial, result):  # noqa: ANN001
        finished.append(result["key"])
        if len(finished) == 2:
            raise Crash  # a BaseException: escapes the observer guard like a kill would

    mod.defenda_trial_finished = defenda_trial_finished
    plugins = load_plugins(extra=[("crasher", mod)])
    study = _study(plugins)
    with pytest.raises(Crash):
        run_study(study, tmp_path, progress=False, plugins=plugins)
    first = _rows(tmp_path)
    assert len(first) == 2  # rows are committed before observers run
    counts = run_study(study, tmp_path, progress=False, plugins=load_plugins())
    assert counts["resumed"] == 2 and counts["ok"] == 4
    rows = _rows(tmp_path)
    assert len(rows) == 6 and len({r["key"] for r in rows}) == 6
    assert {r["key"] for r in rows} == {t.key for t in study.trials()}
    before = {r["key"]: r for r in first}
    for r in rows:  # rows from the first run are untouched
        if r["key"] in before:
            assert r == before[r["key"]]
    assert sqlite3.connect(tmp_path / "results.sqlite").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class Raises(Attack):
    """Always fails."""

    name = "raises"

    def reconstruct(self, update, model, knowledge):  # noqa: ANN001
        raise RuntimeError("attack exploded")


class WrongShape(Attack):
    """Returns the wrong shape."""

    name = "wrong-shape"

    def reconstruct(self, update, model, knowledge):  # noqa: ANN001
        return Reconstruction(torch.zeros(1, 3))


class NeedsMalice(Attack):
    """Needs a malicious server."""

    name = "needs-malice"
    requires = Requirements(server="malicious")

    def reconstruct(self, update, model, knowledge):  # noqa: ANN001
        raise AssertionError("never called")


def test_plugin_failures_become_rows_and_the_study_goes_on(tmp_path: Path) -> None:
    mod = types.ModuleType("hostile")

    @hookimpl
    def defenda_register_attacks(register):  # noqa: ANN001
        for cls in (Raises, WrongShape, NeedsMalice):
            register(cls)

    mod.defenda_register_attacks = defenda_register_attacks
    plugins = load_plugins(extra=[("hostile", mod)])
    attacks = [{"name": n} for n in ("raises", "wrong-shape", "needs-malice")] + [{"name": "geiping",
                                                                                   "iterations": 5}]
    study = _study(plugins, attacks=attacks, defenses=[{"name": "none"}])
    counts = run_study(study, tmp_path, progress=False, plugins=plugins)
    assert counts == {"ok": 2, "error": 4, "skipped": 2, "resumed": 0}
    rows = {(r["attack"], r["seed"]): r for r in _rows(tmp_path)}
    err = rows[("raises", 0)]
    assert err["status"] == "error" and err["plugin"] == "hostile" and err["error_type"] == "RuntimeError"
    assert "attack exploded" in err["reason"]
    assert "sample shape (3,)" in rows[("wrong-shape", 1)]["reason"]
    skip = rows[("needs-malice", 0)]
    assert skip["status"] == "skipped" and "malicious server" in skip["reason"]


def test_same_seeds_give_identical_metrics(tmp_path: Path) -> None:
    plugins = load_plugins()
    study = _study(plugins, defenses=[{"name": "gaussian-noise", "std": 0.01}])
    run_study(study, tmp_path / "a", progress=False, plugins=plugins)
    run_study(study, tmp_path / "b", progress=False, plugins=plugins)
    cols = ("key", "psnr", "ssim", "test_acc", "label_acc")
    a = sorted(tuple(r[c] for c in cols) for r in _rows(tmp_path / "a"))
    b = sorted(tuple(r[c] for c in cols) for r in _rows(tmp_path / "b"))
    assert a == b


def test_second_writer_is_refused(tmp_path: Path) -> None:
    with Store(tmp_path):
        with pytest.raises(StoreError, match="another defenda run"):
            Store(tmp_path)
    Store(tmp_path).close()  # the lock is released with the first store


def test_incompatible_results_file_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "results.sqlite")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT)")
    db.execute("INSERT INTO meta VALUES ('schema_version', '999')")
    db.commit()
    db.close()
    with pytest.raises(StoreError, match="schema version 999"):
        Store(tmp_path)


def test_report_has_tradeoff_and_grids(tmp_path: Path) -> None:
    from defenda.harness.report import write_report

    plugins = load_plugins()
    run_study(_study(plugins), tmp_path, progress=False, plugins=plugins)
    index = write_report(tmp_path)
    text = index.read_text()
    assert "tradeoff_digits_psnr.png" in text and "grid_digits_geiping.png" in text
    assert "Privacy at equal utility" in text and "| gaussian-noise |" in text
    page = (index.parent / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<table>" in page
    # every Markdown table row is one HTML row, with as many cells as its table has headers
    import re

    md_rows = [ln for ln in text.splitlines() if ln.startswith("|") and not set(ln) <= set("|- ")]
    assert page.count("<tr>") == len(md_rows) > 4
    for table in re.findall(r"<table>(.*?)</table>", page):
        rows = re.findall(r"<tr>(.*?)</tr>", table)
        assert len(rows) >= 2 and {r.count("<td>") for r in rows[1:]} == {rows[0].count("<th>")}
    for name in ("tradeoff_digits_psnr.png", "tradeoff_digits_psnr.svg", "grid_digits_geiping.png",
                 "results.csv", "results.parquet"):
        assert (index.parent / name).stat().st_size > 0
    import pandas as pd

    csv = pd.read_csv(index.parent / "results.csv")
    assert len(csv) == 6 and {"psnr", "test_acc", "epsilon", "strength"} <= set(csv.columns)


def test_composed_defense_chains_transforms() -> None:
    from defenda import RoundSettings
    from defenda.compose import make_defense
    from defenda.federation.client import compute_update
    from defenda.models import SmallCNN

    registry = load_plugins().registry
    model = SmallCNN(1, 8, 10)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    honest = compute_update(model, x, y)
    from defenda.errors import ParamError

    with pytest.raises(ParamError, match="distinct defenses"):
        make_defense(registry, "gaussian-noise+gaussian-noise", {})
    # clip the update to norm 1e-3 (no noise), then the no-op stage
    composed = make_defense(registry, "gaussian-noise+none", {"gaussian-noise": {"std": 0.0, "clip": 1e-3}})
    out = composed.client_update(model, x, y, RoundSettings(), torch.Generator().manual_seed(0))
    norm = torch.sqrt(sum((t ** 2).sum() for t in out.tensors))
    assert abs(float(norm) - 1e-3) < 1e-6
    assert torch.sqrt(sum((t ** 2).sum() for t in honest.tensors)) > 1e-2
