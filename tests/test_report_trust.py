"""The report's trust sections (issue 14): the prior-only baseline (band, column, cells marked that do
not beat it), readable leakage axes, success rates with Wilson intervals, bounds beside ε and the
violation check, and old stores that lack all of it."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import defenda.harness.report as report
from defenda.harness.report import write_report
from defenda.harness.report_style import DISPLAY_MULTIPLE, NOT_BEATEN, clip_for_display, display_for
from defenda.harness.report_trust import cp_lower, pooled, wilson, with_priors
from defenda.harness.store import Store

#: prior-only MAE on every synthetic batch: the public mean, a random public sample
PRIOR_MAE = {"mean": 0.75, "sample": 1.10}
#: (attack, defense, strength) -> MAE; stein under 1-bit quantization diverges as in the issue (10¹⁵)
MAE = {("geiping", "none", None): 0.05, ("geiping", "quantize", 1.0): 0.9, ("geiping", "dp-sgd", 1.0): 0.5,
       ("stein", "none", None): 0.49, ("stein", "quantize", 1.0): 4e15, ("stein", "dp-sgd", 1.0): 0.8}
SEEDS = (0, 1, 2)
B = 8


def _key(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def _tabular_store(out: Path, ident: float = 0.25, gamma: float = 0.6) -> None:
    """A single-client tabular study with issue 14's fields: DP rows identify at ``ident`` under bound ``gamma``."""
    with Store(out) as store:
        for (attack, defense, strength), mae in MAE.items():
            for seed in SEEDS:
                ukey = _key("u", defense, strength, seed)
                acc = 0.95 - (0.01 if defense != "none" else 0.0)
                store.add_utility({"key": ukey, "task": "breast-cancer", "defense": defense, "strength": strength,
                                   "params": {}, "seed": seed, "status": "ok", "reason": "", "test_acc": acc,
                                   "epsilon": 5.0 if defense == "dp-sgd" else None, "seconds": 1.0,
                                   "finished_at": ""})
                dp = defense == "dp-sgd"
                extra: dict[str, Any] = {
                    "identification": {"candidates": 10, "kappa": 0.1}, "clipped_fraction": 0.3 if mae > 10 else 0.0,
                    "baseline": {name: {"mae": v, "ident_acc": 0.125 if name == "sample" else 0.0}
                                 for name, v in PRIOR_MAE.items()}}
                if dp:
                    extra["rero"] = {"kappa": 0.1, "bound": gamma, "method": "pld", "covered": True, "reason": "",
                                     "gdp_estimate": gamma - 0.05}
                store.add_trial({
                    "key": _key("t", attack, defense, strength, seed), "study": "tab", "task": "breast-cancer",
                    "attack": attack, "defense": defense, "strength": strength, "batch_size": B, "seed": seed,
                    "params": {"task": {}, "attack": {}, "defense": {}}, "status": "ok", "reason": "",
                    "plugin": "test", "mae": mae * (1 + 0.01 * seed), "test_acc": acc,
                    "epsilon": 5.0 if dp else None, "server": "malicious" if attack == "stein" else "honest",
                    "knowledge": {}, "versions": {}, "extra": extra, "utility_key": ukey, "finished_at": "",
                    "exact_rate": 1.0 if mae < 0.1 else 0.0, "recognised_rate": 1.0 if mae <= 0.25 else 0.0,
                    "ident_acc": ident if dp else (1.0 if mae < 0.6 else 0.0),
                    "epsilon_release": 1.5 if dp else None, "rero_bound": gamma if dp else None})


@pytest.fixture(scope="module")
def tabular_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tab")
    _tabular_store(out)
    return write_report(out)


def test_the_prior_is_the_attackers_better_guess_in_the_metrics_direction() -> None:
    rows = pd.DataFrame({"extra": [{"baseline": {"mean": {"psnr": 8.5, "mae": 0.75},
                                                 "sample": {"psnr": 7.0, "mae": 1.1}}}, {}]})
    df = with_priors(rows)
    assert df.loc[0, "prior:psnr"] == 8.5 and df.loc[0, "prior:mae"] == 0.75  # higher PSNR, lower MAE
    assert np.isnan(df.loc[1, "prior:psnr"])  # a row without a baseline
    assert df["ident_acc"].isna().all()  # the trust columns exist, empty, for rows that lack them


def test_cells_that_do_not_beat_the_prior_only_guess_are_marked(tabular_report: Path) -> None:
    text = tabular_report.read_text()
    table = text.split("### All cells", 1)[1].split("###", 1)[0]
    row = {tuple(c.strip() for c in ln.split("|")[1:4]): ln for ln in table.splitlines() if ln.startswith("| ")}
    assert "| 0.05 | 0.75 |" in row[("geiping", "none", "")]  # beats the mean guess: no mark, baseline beside
    assert f"0.91 {NOT_BEATEN} | 0.75 |" in row[("geiping", "quantize", "1")]  # lower is worse: 0.91 ≥ 0.75
    assert f"4.04e+15 {NOT_BEATEN}" in row[("stein", "quantize", "1")]  # huge values stay measured, short
    assert "30.0%" in row[("stein", "quantize", "1")]  # the clipped fraction beside it
    equal = text.split("### Privacy at equal utility", 1)[1].split("###", 1)[0]
    assert "worst-case mae, honest server | prior only, honest server |" in equal
    assert "prior only (no update)" in text and "0.75 and 1.1" in text


def test_no_leakage_axis_reaches_beyond_the_prior_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tabular_store(tmp_path)
    figures: list[Any] = []
    real = report._plt()

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def close(self, fig: Any) -> None:
            figures.append(fig)

    monkeypatch.setattr(report, "_plt", lambda: Recording())
    write_report(tmp_path)
    cap = DISPLAY_MULTIPLE * PRIOR_MAE["sample"]
    tradeoff = figures[0]
    tops = [ax.get_ylim()[1] for ax in tradeoff.axes if ax.has_data()]
    assert tops and max(tops) < 1.2 * cap  # the 4·10¹⁵ MAE is drawn at the cap, not at 10¹⁵
    for fig in figures:
        real.close(fig)


def test_display_cap_is_a_multiple_of_the_worse_guess_and_clipping_is_reported() -> None:
    rows = with_priors(pd.DataFrame({"mae": [0.1, 5e15], "extra": [{"baseline": {"mean": {"mae": 0.7},
                                                                                "sample": {"mae": 1.0}}}] * 2}))
    disp = display_for(rows, "mae")
    assert disp.band == (0.7, 1.0) and disp.cap == DISPLAY_MULTIPLE * 1.0
    agg = pd.DataFrame({"leak": [0.1, 5e15], "leak_lo": [0.1, 1.0], "leak_hi": [0.2, 6e15]})
    drawn, clipped = clip_for_display(agg, disp)
    assert clipped == disp.cap and drawn["leak_hi"].max() == disp.cap
    # no baseline (an old store): the data's own median sets the scale
    old = pd.DataFrame({"mae": [0.2, 0.4, 1e15]})
    assert display_for(old, "mae").cap == DISPLAY_MULTIPLE * 0.4
    assert display_for(old.rename(columns={"mae": "psnr"}), "psnr").cap == report.PSNR_CEILING


def test_intervals_match_the_reference_values() -> None:
    lo, hi = wilson(3, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.0103, 0.0845)  # bounds.md §5.3
    assert wilson(100, 100)[0] == pytest.approx(0.9630, abs=1e-4)
    assert cp_lower(0, 50, 0.05) == 0.0 and cp_lower(16, 16, 0.05) == pytest.approx(0.05 ** (1 / 16))
    rows = pd.DataFrame({"ident_acc": [0.25] * 3 + [0.0] * 22 + [np.nan], "batch_size": [4] * 26})
    assert pooled(rows, "ident_acc") == (3, 100)  # k = round(rate·B), rows without a rate left out


def test_success_rates_pool_every_seeds_samples_with_wilson_intervals(tabular_report: Path) -> None:
    text = tabular_report.read_text()
    section = text.split("### Success rates", 1)[1].split("###", 1)[0]
    assert "correlated" in section and "Sun et al., NeurIPS 2023" in section and "κ = 1/n" in section
    row = next(ln for ln in section.splitlines() if ln.startswith("| geiping | none |"))
    assert "| 0.1 |" in row  # κ
    assert "24/24 = 1.00 (0.86–1.00)" in row  # exact, recognised, identified: 3 seeds × 8 samples
    dp = next(ln for ln in section.splitlines() if ln.startswith("| geiping | dp-sgd |"))
    assert "6/24 = 0.25 (0.12–0.45)" in dp and "| 0.12 |" in dp  # the sample guess identifies 1 in 8
    csv = pd.read_csv(tabular_report.parent / "success_breast-cancer.csv")
    per_seed = csv[(csv["attack"] == "geiping") & (csv["defense"] == "dp-sgd") & (csv["rate"] == "ident_acc")]
    assert sorted(per_seed["seed"].astype(str)) == ["0", "1", "2", "all"]
    assert set(per_seed.loc[per_seed["seed"] != "all", "n"]) == {B}


def test_bounds_stand_beside_epsilon_and_no_violation_is_claimed_below_them(tabular_report: Path) -> None:
    text = tabular_report.read_text()
    section = text.split("### Reconstruction bounds beside ε", 1)[1].split("\n## ", 1)[0]
    assert "(bounds_breast-cancer.png)" in section
    assert (tabular_report.parent / "bounds_breast-cancer.png").stat().st_size > 10_000
    row = next(ln for ln in section.splitlines() if ln.startswith("| geiping | dp-sgd |"))
    assert "| 5 | 1.5 |" in row and "0.600 (pld)" in row and "| 0.550 |" in row
    assert "VIOLATION" not in text and "## Problems" not in text


def test_a_rate_above_its_bound_is_flagged_as_a_bug(tmp_path: Path) -> None:
    _tabular_store(tmp_path, ident=1.0, gamma=0.2)  # 24/24 identified where no attacker exceeds 0.2
    text = write_report(tmp_path).read_text()
    problems = text.split("## Problems", 1)[1]
    assert problems.count("VIOLATION — a bug somewhere") == 2  # geiping and stein under dp-sgd
    assert "identified 24/24" in problems and "γ = 0.200" in problems


def test_a_bound_that_does_not_cover_the_adversary_says_why(tmp_path: Path) -> None:
    from test_report_federation import _federated_store

    _federated_store(tmp_path)
    text = write_report(tmp_path).read_text()
    section = text.split("### Reconstruction bounds beside ε", 1)[1]
    row = next(ln for ln in section.splitlines() if ln.startswith("| stein | dp-fedavg |"))
    assert "not covered: central DP-FedAvg: the server sees client updates before the noise" in row
    assert "## Problems" not in text


def test_an_old_store_without_the_new_columns_still_reports(tmp_path: Path) -> None:
    _tabular_store(tmp_path)
    db = sqlite3.connect(tmp_path / "results.sqlite")
    for col in ("exact_rate", "recognised_rate", "ident_acc", "epsilon_release", "rero_bound"):
        db.execute(f"ALTER TABLE trials DROP COLUMN {col}")
    db.execute("UPDATE trials SET extra = '{}'")
    db.commit()
    db.close()
    text = write_report(tmp_path).read_text()
    assert "tradeoff_breast-cancer_mae.png" in text
    assert "### Success rates" not in text and "bounds beside ε" not in text and "prior only" not in text
    assert "three times the median" in text  # the axis is still capped, at the data's own scale
