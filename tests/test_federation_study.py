"""Studies with a [federation] table: parsing, rows, accounting on the same run, resume."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from defenda.errors import StudyError
from defenda.harness.runner import run_study
from defenda.harness.study import parse_study

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registry():
    from defenda.plugins import get_plugins

    return get_plugins().registry


def _study(**federation):
    fed = {"clients": 6, "partition": "dirichlet", "alpha": 0.5, "clients_per_round": 3, "rounds": 4,
           "local_batch_size": 2, **federation}
    return {
        "study": {"name": "fl", "seeds": [0], "knowledge": ["batch_size"], "server": "malicious"},
        "federation": fed,
        "task": {"name": "breast-cancer", "model": "mlp", "widths": [32]},
        "attacks": [{"name": "spear", "max_proposals": 50_000}],
        "defenses": [{"name": "none"}, {"name": "dp-sgd", "noise_multiplier": 1.0},
                     {"name": "dp-fedavg", "noise_multiplier": 1.0},
                     {"name": "secure-aggregation", "quantization_range": 0},
                     {"name": "dp-fedavg+secure-aggregation", "dp-fedavg": {"mode": "distributed", "noise_multiplier": 1.0},
                      "secure-aggregation": {"quantization_range": 0}}],
    }


def _rows(out: Path, sql: str) -> list[sqlite3.Row]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    return db.execute(sql).fetchall()


def _opacus_rdp(history: list[tuple[float, float, int]], delta: float = 1e-5) -> float:
    """ε straight from Opacus' RDP accountant for a history of (σ, q, steps)."""
    import warnings

    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    acc.history = list(history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def test_federation_table_sweeps_and_expands_per_round(registry) -> None:
    study = parse_study(_study(clients_per_round=[1, 3], attack_rounds=[[0], [1, 3]]), registry)
    assert study.federations is not None and len(study.federations) == 4
    trials = study.trials()
    # 4 federations x 5 defenses x (1 or 2 attack rounds)
    assert len(trials) == 2 * 5 * 1 + 2 * 5 * 2
    assert {t.round for t in trials} == {0, 1, 3}
    assert len({t.utility_key for t in trials}) == 20  # one training run per federation x defense
    assert len({t.key for t in trials}) == len(trials)


@pytest.mark.parametrize(("patch", "message"), [
    ({"federation": {"clinets": 3}}, "did you mean 'clients'"),
    ({"federation": {"clients": 3, "clients_per_round": 5}}, "cannot exceed clients"),
    ({"federation": {"rounds": 3, "attack_rounds": [5]}}, "attack_rounds must lie in 0..2"),
    ({"federation": {"partition": "dirichlet", "alpha": -1}}, "alpha must be a number > 0"),
    ({"study": {"name": "x", "rounds": 10}}, "set 'rounds' in [federation]"),
    ({"study": {"name": "x", "batch_sizes": [4]}}, "set 'local_batch_size' in [federation]"),
])
def test_federation_errors_are_one_line_and_say_what_to_do(registry, patch, message) -> None:
    raw = _study()
    for section, values in patch.items():
        raw[section] = values
    with pytest.raises(StudyError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_study(raw, registry)


def test_federated_study_rows_accounting_and_resume(registry, tmp_path: Path, monkeypatch) -> None:
    import json

    import defenda.harness.federated as federated
    from defenda.federation.accounting import client_level_epsilon, ledger_epsilon

    calls = []
    real = federated.run_federation

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "run_federation", counting)
    out = tmp_path / "out"
    counts = run_study(parse_study(_study(), registry), out, progress=False)
    assert counts["ok"] + counts["skipped"] == 10 and counts["error"] == 0
    assert len(calls) == 5
    rows = _rows(out, "SELECT * FROM trials")
    assert {r["round"] for r in rows} == {0, 3}
    plain = [r for r in rows if r["defense"] == "none"]
    assert all(r["aggregation_size"] == 1 and r["num_samples"] == 2 and r["client"] >= 0 for r in plain)
    assert all(r["psnr"] is None or r["mae"] is not None for r in rows)
    secagg = [r for r in rows if r["defense"] == "secure-aggregation"]
    assert all(r["aggregation_size"] == 3 and r["num_samples"] == 6 and r["client"] == -1 for r in secagg)
    distributed = [r for r in rows if r["defense"] == "dp-fedavg+secure-aggregation"]
    assert all(r["epsilon_round"] == pytest.approx(_opacus_rdp([(1.0, 3 / 6, r["round"] + 1)]), rel=1e-9)
               for r in distributed)
    assert all(json.loads(r["extra"])["noise_position"] == "before" for r in distributed)
    # utility and ε of the same run
    util = {u["defense"]: u for u in _rows(out, "SELECT * FROM utility")}
    for r in rows:
        assert r["test_acc"] == util[r["defense"]]["test_acc"]

    fed = [r for r in rows if r["defense"] == "dp-fedavg"][0]
    assert fed["epsilon"] == pytest.approx(_opacus_rdp([(1.0, 3 / 6, 4)]), rel=1e-9)  # z, q = K/N, R, δ
    assert fed["epsilon_round"] == pytest.approx(client_level_epsilon(1.0, 3 / 6, fed["round"] + 1, 1e-5), rel=1e-9)
    assert json.loads(fed["extra"])["noise_position"] == "after"  # central DP: the server sees the clipped update
    dp = [r for r in rows if r["defense"] == "dp-sgd" and r["round"] == 3][0]
    extra = json.loads(util["dp-sgd"]["extra"])
    sizes, part = extra["client_sizes"], extra["participations"][str(dp["client"])]
    # the attacked client's ledger at the last round: every participation, one FedSGD step at q = b/n_k
    expected = _opacus_rdp([(1.0, 2 / sizes[dp["client"]], part)])
    assert expected == pytest.approx(ledger_epsilon([(1.0, 2 / sizes[dp["client"]], 1)] * part, 1e-5), rel=1e-9)
    assert dp["epsilon_round"] == pytest.approx(expected, rel=1e-9)
    assert dp["epsilon"] >= dp["epsilon_round"]  # the run's ε: the worst client
    assert len(extra["accuracy"]) == 4

    # resume: trials lost (a crash during attacks) are re-run; no training run is repeated
    db = sqlite3.connect(out / "results.sqlite")
    db.execute("DELETE FROM trials WHERE defense IN ('none', 'dp-sgd')")
    db.commit()
    db.close()
    calls.clear()
    again = run_study(parse_study(_study(), registry), out, progress=False)
    assert calls == [] and again["resumed"] == 6 and again["ok"] + again["skipped"] == 4
    assert len(_rows(out, "SELECT key FROM trials")) == 10


def test_a_study_killed_in_a_training_run_keeps_the_finished_runs(registry, tmp_path: Path, monkeypatch) -> None:
    import defenda.harness.federated as federated

    real = federated.run_federation
    calls = []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "run_federation", dies_on_second)
    out = tmp_path / "out"
    raw = _study()
    raw["defenses"] = raw["defenses"][:2]
    with pytest.raises(KeyboardInterrupt):
        run_study(parse_study(raw, registry), out, progress=False)
    assert len(_rows(out, "SELECT key FROM utility")) == 1
    calls.clear()
    monkeypatch.setattr(federated, "run_federation", real)
    counts = run_study(parse_study(raw, registry), out, progress=False)
    assert counts["ok"] + counts["skipped"] == 4
    assert len(_rows(out, "SELECT key FROM utility")) == 2


def test_a_failed_training_run_gives_its_trials_error_rows(registry, tmp_path: Path, monkeypatch) -> None:
    import defenda.harness.federated as federated

    def broken(*args, **kwargs):
        raise RuntimeError("diverged")

    monkeypatch.setattr(federated, "run_federation", broken)
    raw = _study()
    raw["defenses"] = [{"name": "none"}]
    counts = run_study(parse_study(raw, registry), tmp_path / "out", progress=False)
    assert counts["error"] == 2
    rows = _rows(tmp_path / "out", "SELECT reason, error_type FROM trials")
    assert all("training run failed: RuntimeError: diverged" in r["reason"] for r in rows)


def test_an_attack_that_needs_one_client_is_skipped_under_secure_aggregation(registry) -> None:
    from defenda import Attack, Requirements
    from defenda.harness.trial import skip_reason

    class OneClientOnly(Attack):
        name = "one-client-only"
        requires = Requirements(observations=frozenset({"client"}))

    study = parse_study(_study(), registry)
    trial = study.trials()[0]
    _, data = __import__("defenda.harness.services", fromlist=["load_task"]).load_task(
        registry, trial.task, trial.task_params)
    secagg = registry.get("defense", "secure-aggregation").cls()
    assert "only the aggregate" in skip_reason(OneClientOnly(), trial, data, secagg)
    assert skip_reason(OneClientOnly(), trial, data, registry.get("defense", "none").cls()) is None
    with pytest.raises(ValueError, match="unknown observations"):
        Requirements(observations=frozenset({"sum"}))


def test_a_partition_that_cannot_be_drawn_is_a_clear_error_before_any_run(registry) -> None:
    from defenda.harness.study import check_against_data

    study = parse_study(_study(clients=300, alpha=0.001), registry)
    with pytest.raises(StudyError, match="seed 0: no dirichlet partition .* raise alpha or lower clients"):
        check_against_data(study, registry)
    with pytest.raises(StudyError, match="clients = 500 is more than task 'breast-cancer' has training samples"):
        check_against_data(parse_study(_study(clients=500), registry), registry)
