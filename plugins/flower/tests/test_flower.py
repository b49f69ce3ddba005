# ruff: noqa: F811 - the fixtures come from defenda.testing (pytest_plugins in conftest.py)
"""defenda-flower: the audit on the example Flower app, the ground-truth opt-in, Flower's mods as defenses.

Everything runs in this process through Flower's public ServerApp/ClientApp callables
(defenda_flower.inprocess); the one test of Flower's own (Ray) simulation engine is
skipped when Ray is not installed.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod

from defenda import RoundSettings
from defenda.testing import assert_installed, check_defense
from defenda_flower import example
from defenda_flower.defenses import (
    FlowerCentralDp,
    FlowerFixedClipping,
    FlowerLocalDp,
    flower_messages,
    noise_seed,
    numpy_seeded,
)
from defenda_flower.inprocess import run_inprocess, task_identity
from defenda_flower.training import batches_for, train_copy
from defenda_flower.truth import TRUTH_KEY

FEDSGD = {"max-steps": 1, "batch-size": 8, "num-server-rounds": 1}


class Spy:
    """A ClientApp callable that records, per (round, node), the arrays received and the reply sent."""

    def __init__(self, app: ClientApp) -> None:
        self.app = app
        self.seen: dict[tuple[int, int], dict[str, Any]] = {}

    def __call__(self, msg: Any, context: Context) -> Any:
        received = {k: a.numpy() for k, a in next(iter(msg.content.array_records.values())).items()}
        reply = self.app(msg, context)
        if msg.metadata.message_type.startswith("train"):
            server_round = int(next(iter(msg.content.config_records.values()))["server-round"])
            self.seen[(server_round, context.node_id)] = {
                "received": received,
                "sent": {k: a.numpy() for k, a in next(iter(reply.content.array_records.values())).items()},
                "truth": TRUTH_KEY in reply.content.config_records}
        return reply


def rows(out: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(out / "results.sqlite")
    db.row_factory = sqlite3.Row
    return [dict(r) | {"extra": json.loads(r["extra"] or "{}")} for r in db.execute("SELECT * FROM trials")]


def run_example(tmp: Path, clients: int = 3, mods: tuple[Any, ...] = (), share: bool | None = True,
                node_config: dict[str, Any] | None = None, **cfg: Any) -> tuple[dict[str, Any], Spy]:
    spy = Spy(example.make_client_app(mods, share=share))
    res = example.run(clients, client_app_=spy, node_config=node_config, out=str(tmp), **cfg)
    return res, spy


# ---------------------------------------------------------------------------------------- the audit


def test_one_row_per_round_client_attack_and_the_update_is_reply_minus_global(tmp_path: Path) -> None:
    res, spy = run_example(tmp_path, 2, **{"num-server-rounds": 2, "local-epochs": 2, "batch-size": 16,
                                         "client-samples": 40, "keep-updates": True,
                                         "attacks": "spear:max_proposals=2000,geiping:iterations=5"})
    got = rows(tmp_path)
    keys = sorted((r["round"], r["client"], r["attack"]) for r in got)
    assert keys == sorted((rnd, node, a) for rnd in (1, 2) for node in (10_000, 10_001)
                          for a in ("spear", "geiping"))
    assert {r["status"] for r in got} == {"ok"}
    audit = example._find_audit(res["strategy"])
    assert set(audit.updates) == set(spy.seen) and len(spy.seen) == 4
    for (rnd, node), seen in spy.seen.items():
        update = audit.updates[(rnd, node)]
        assert update.kind == "delta" and update.local_epochs == 2 and update.local_batch_size == 16
        for name, tensor in zip(update.names, update.tensors):
            expected = np.subtract(seen["sent"][name], seen["received"][name])
            assert tensor.numpy().dtype == expected.dtype and np.array_equal(tensor.numpy(), expected), name
    r = got[0]
    assert r["extra"]["observes"].startswith("the raw client replies") and r["test_acc"] is not None
    assert json.loads(r["params"])["federation"]["strategy"] == "LeakageAudit > FedAvg"


def test_spear_recovers_a_fedsgd_round_and_local_dp_drives_it_to_the_prior(tmp_path: Path) -> None:
    run_example(tmp_path / "open", 2, **FEDSGD)
    clear = rows(tmp_path / "open")
    assert len(clear) == 2
    for r in clear:  # scored against the batch the client recorded
        assert r["batch_size"] == 8 and r["exact_rate"] == 1.0 and r["psnr"] > 100, r
    run_example(tmp_path / "dp", 2, mods=(LocalDpMod(1.0, 2.0, 1.0, 1e-5),), **FEDSGD,
                **{"local-dp-epsilon": 1.0})
    noisy = rows(tmp_path / "dp")
    for r in noisy:
        prior = max(b["psnr"] for b in r["extra"]["baseline"].values())
        assert r["defense"] == "flower-local-dp" and r["exact_rate"] == 0.0
        assert r["psnr"] < prior + 1.0, (r["psnr"], r["extra"]["baseline"])


def test_the_report_draws_the_audit(tmp_path: Path) -> None:
    from defenda.harness.report import write_report

    run_example(tmp_path, 2, **FEDSGD)
    index = write_report(tmp_path)
    text = index.read_text()
    assert "spear" in text and "0 error" in text and (tmp_path / "report" / "grid_digits_spear.png").exists()


@pytest.mark.parametrize("position", ["outer", "inner"])
def test_where_the_audit_sits_decides_what_it_sees(tmp_path: Path, position: str) -> None:
    clip = 1e-3
    res, spy = run_example(tmp_path, 2, **FEDSGD, **{"server-dp-noise": 0.5, "server-dp-clip": clip,
                                                    "audit-position": position, "keep-updates": True})
    audit = example._find_audit(res["strategy"])
    for (rnd, node), seen in spy.seen.items():
        raw = np.sqrt(sum(float(np.sum(np.subtract(seen["sent"][k], seen["received"][k]).astype(np.float64) ** 2))
                          for k in seen["sent"]))
        norm = float(torch.sqrt(sum((t.double() ** 2).sum() for t in audit.updates[(rnd, node)].tensors)))
        assert raw > 10 * clip
        if position == "outer":
            assert norm == pytest.approx(raw, rel=1e-6)
        else:
            assert norm == pytest.approx(clip, rel=1e-3)
    r = rows(tmp_path)[0]
    assert ("after DifferentialPrivacyServerSideFixedClipping" in r["extra"]["observes"]) == (position == "inner")
    assert r["extra"]["noise_position"] == "after" and r["defense"] == "flower-central-dp"


# ---------------------------------------------------------------------------------------- ground truth opt-in


def test_without_consent_no_data_leaves_the_client(tmp_path: Path) -> None:
    _, spy = run_example(tmp_path, 2, share=None, **FEDSGD)  # GroundTruthMod(): the node did not opt in
    assert spy.seen and not any(s["truth"] for s in spy.seen.values())
    got = rows(tmp_path)
    assert len(got) == 2 and all(r["status"] == "ok" and r["psnr"] is None for r in got)
    assert all("not scored" in r["reason"] for r in got)
    assert len(list((tmp_path / "flower-unscored").glob("*.npz"))) == 2  # reconstructions kept, unscored


def test_consent_by_node_config(tmp_path: Path) -> None:
    _, spy = run_example(tmp_path, 2, share=None, node_config={"defenda-share-truth": True}, **FEDSGD)
    assert all(s["truth"] for s in spy.seen.values())
    assert all(r["psnr"] is not None for r in rows(tmp_path))


def test_without_the_servers_request_no_data_is_sent(tmp_path: Path) -> None:
    _, spy = run_example(tmp_path, 2, share=True, **FEDSGD, audit=False)  # a normal run: no LeakageAudit
    assert spy.seen and not any(s["truth"] for s in spy.seen.values())
    assert not (tmp_path / "results.sqlite").exists()


# ---------------------------------------------------------------------------------------- Flower's mods as defenses


def _case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    _, data = example.task_data()
    torch.manual_seed(0)
    model = example.build_model()
    return model, data.train[0][:12], data.train[1][:12]


def _flower_client(mods: list[Any], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                   settings: RoundSettings, config: dict[str, Any], seed: int | None) -> dict[str, np.ndarray]:
    """What a Flower ClientApp with ``mods`` sends for this batch (the delta from θ_r), Flower applying the mods."""
    from defenda_flower.arrays import delta_arrays, model_arrays

    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Any, context: Context) -> Any:
        _, reply = flower_messages(model, train_copy(model, batches_for(x, y, settings), settings.lr), {}, len(x))
        from flwr.app import Message

        return Message(reply.content, reply_to=msg)

    msg, _ = flower_messages(model, model, config, len(x))
    with task_identity(run_id=0), numpy_seeded(seed):
        out = app(msg, Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    assert not out.has_error(), out.error
    return delta_arrays(next(iter(out.content.array_records.values())), model_arrays(model))


@pytest.mark.parametrize("defense, mods, config", [
    (FlowerLocalDp(epsilon=5.0, clipping_norm=0.05), [LocalDpMod(0.05, 0.1, 5.0, 1e-5)], {}),
    (FlowerFixedClipping(clipping_norm=0.01), [fixedclipping_mod], {"clipping_norm": 0.01}),
    (FlowerCentralDp(noise_multiplier=1.0, clipping_norm=0.02), [fixedclipping_mod], {"clipping_norm": 0.02}),
], ids=["local-dp", "fixed-clipping", "central-dp-client-clipping"])
def test_the_defense_sends_the_same_bytes_as_flower(defense: Any, mods: list[Any], config: dict[str, Any]) -> None:
    model, x, y = _case()
    settings = RoundSettings(kind="delta", lr=0.1, local_epochs=2, local_batch_size=4, order_seed=3)
    gen = torch.Generator().manual_seed(7)
    seed = noise_seed(copy.deepcopy(gen))
    update = defense.client_update(model, x, y, settings, gen)
    flower = _flower_client(mods, model, x, y, settings, config, seed)
    for name, tensor in zip(update.names, update.tensors):
        assert tensor.numpy().tobytes() == flower[name].tobytes(), name
    assert update.meta["observes"]


def test_local_dp_noise_scale_and_position() -> None:
    d = FlowerLocalDp(epsilon=1.0, clipping_norm=1.0)
    assert d.std == pytest.approx(2.0 * np.sqrt(2 * np.log(1.25 / 1e-5)), rel=1e-12)
    assert d.noise_position() == "before" and FlowerCentralDp().noise_position() == "after"
    assert FlowerFixedClipping().noise_position() is None


def test_server_side_clipping_aggregates_like_flowers_wrapper() -> None:
    from flwr.app import ArrayRecord, Message, MetricRecord
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    from defenda.federation.aggregation import weighted_sum
    from defenda.records import FederationPlan
    from defenda_flower.arrays import model_arrays

    model, x, y = _case()
    d = FlowerCentralDp(noise_multiplier=0.0, clipping_norm=0.01, clipping="server")
    d.join_federation(FederationPlan(clients=2, clients_per_round=2, rounds=1))
    settings = RoundSettings(kind="delta", lr=0.1, local_steps=2)
    halves = [(x[:5], y[:5]), (x[5:], y[5:])]
    updates = [d.client_update(model, bx, by, settings, torch.Generator().manual_seed(i))
               for i, (bx, by) in enumerate(halves)]
    raw_norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in u.tensors))) for u in updates]
    assert min(raw_norms) > 0.01  # the server observes the raw updates
    weights = d.aggregation_weights([5, 7])
    step = d.server_update(weighted_sum(updates, weights), 2, torch.Generator().manual_seed(0))
    # Flower's own wrapper on the same replies
    sent = model_arrays(model)
    with task_identity(run_id=0):
        msg, _ = flower_messages(model, model, {}, 0)
        replies = []
        for bx, by in halves:
            trained = train_copy(model, batches_for(bx, by, settings), settings.lr)
            replies.append(Message(RecordDict({"arrays": ArrayRecord({k: v.detach() for k, v in
                                                                      trained.state_dict().items()}),
                                               "metrics": MetricRecord({"num-examples": len(bx)})}), reply_to=msg))
    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 0.0, 0.01, 2)
    wrapper.current_arrays = sent
    agg, _ = wrapper.aggregate_train(1, replies)
    names = [n for n, _ in model.named_parameters()]
    for name, t in zip(names, step.tensors):
        expected = agg[name].numpy() - sent[name].numpy()
        np.testing.assert_allclose(t.numpy(), expected, atol=2e-7)


@pytest.mark.parametrize("cls", [FlowerLocalDp, FlowerFixedClipping, FlowerCentralDp])
def test_contract(cls: type) -> None:
    check_defense(cls)


def test_defenda_plugins_lists_the_package() -> None:
    [entry] = assert_installed("defenda-flower", {"defenses": ["flower-central-dp", "flower-fixed-clipping",
                                                                "flower-local-dp"]})
    assert entry["module"] == "defenda_flower" and not entry["builtin"]


# ---------------------------------------------------------------------------------------- Flower's engine


@pytest.mark.engine
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Ray's subprocesses at shutdown
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Flower's simulation engine needs Ray "
                    "(pip install 'flwr[simulation]'); the in-process runner covers the same apps")
def test_flowers_simulation_engine_runs_the_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.simulation import run_simulation

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(example, "DEFAULTS", {**example.DEFAULTS, **FEDSGD, "min-nodes": 2})
    run_simulation(server_app=example.server_app, client_app=example.client_app, num_supernodes=2,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": 1}})
    got = rows(tmp_path / "flower-audit")
    assert len(got) == 2 and all(r["status"] == "ok" and r["exact_rate"] == 1.0 for r in got)


def test_inprocess_runner_returns_its_facts(tmp_path: Path) -> None:
    res = run_inprocess(example.server_app, example.make_client_app(), 2,
                        run_config={"out": str(tmp_path), "audit": False, "num-server-rounds": 1, **FEDSGD})
    assert res["messages"] == 2 and set(res["contexts"]) == {10_000, 10_001}
