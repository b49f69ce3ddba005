"""The example Flower app: FedAvg with local epochs on defenda's embedded digits, audited by defenda.

A ServerApp and a ClientApp of Flower's Message API. Each of the N supernodes holds an
IID share of the digits train split (8×8 images, an MLP whose first layer is
Linear→ReLU, so SPEAR applies); every round FedAvg sends the global model, each client
trains ``local-epochs`` epochs of mini-batches of ``batch-size`` at ``lr`` (at most
``max-steps`` steps; ``max-steps = 1`` is a FedSGD-style round: one step on one batch),
and the server — wrapped in :class:`~defenda_flower.audit.LeakageAudit` — attacks every
reply and writes the rows to ``out``.

Run it (one command, in this process, no Ray)::

    defenda-flower-example --out flower-audit --report      # or: python -m defenda_flower.example

or with Flower's simulation engine (needs ``pip install "flwr[simulation]"``, i.e. Ray)::

    flwr run plugins/flower/examples/digits-audit

The three audit lines (marked ``# defenda``) are all a Flower user adds to their own app.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch import nn

from defenda import RoundSettings
from defenda.harness.services import load_task
from defenda.plugins import get_plugins
from defenda_flower.arrays import load_arrays, model_arrays
from defenda_flower.audit import LeakageAudit
from defenda_flower.training import batches_for, train_copy
from defenda_flower.truth import GroundTruthMod, record_training_data

TASK = "digits"
TASK_PARAMS: dict[str, Any] = {"model": "mlp", "widths": [200]}

#: the run config of the example (``flwr run --run-config`` / ``run_inprocess(run_config=...)`` override it)
DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 2, "fraction-train": 1.0, "lr": 0.1, "local-epochs": 1, "batch-size": 16,
    "max-steps": 0, "attacks": "spear", "knowledge": "", "out": "flower-audit", "seed": 0, "audit": True,
    "audit-position": "outer", "server-dp-noise": 0.0, "server-dp-clip": 1.0, "local-dp-epsilon": 0.0,
    "local-dp-clip": 1.0, "client-samples": 0, "min-nodes": 1,
}


def config_of(context: Context) -> dict[str, Any]:
    return {**DEFAULTS, **dict(context.run_config)}


def task_data() -> Any:
    return load_task(get_plugins().registry, TASK, TASK_PARAMS)


def build_model() -> nn.Module:
    """The app's model: defenda's MLP for 8×8 digits (Linear(64, 200) → ReLU → Linear(200, 10))."""
    task, data = task_data()
    return task.build_model(data)


def partition_of(partition_id: int, num_partitions: int, seed: int = 0) -> np.ndarray:
    """The indices of the train split this supernode holds (an IID share)."""
    _, data = task_data()
    perm = np.random.default_rng(seed).permutation(len(data.train[0]))
    return np.array_split(perm, num_partitions)[partition_id]


# ---------------------------------------------------------------------------------------- ClientApp


def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's share; reply with the new weights and num-examples."""
    cfg = {**config_of(context), **dict(next(iter(msg.content.config_records.values())).items())}
    _, data = task_data()
    idx = partition_of(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                       int(cfg["seed"]))
    if int(cfg["client-samples"]) > 0:
        idx = idx[: int(cfg["client-samples"])]
    x, y = data.train[0][idx], data.train[1][idx]
    torch.manual_seed(int(cfg["seed"]))
    model = load_arrays(build_model(), next(iter(msg.content.array_records.values())))
    server_round = int(cfg.get("server-round", 1))
    settings = RoundSettings(kind="delta", lr=float(cfg["lr"]), local_epochs=int(cfg["local-epochs"]),
                             local_batch_size=int(cfg["batch-size"]),
                             order_seed=1000 * server_round + int(context.node_config["partition-id"]))
    batches = batches_for(x, y, settings, max_steps=int(cfg["max-steps"]))
    trained = train_copy(model, batches, settings.lr)
    used = torch.unique(torch.cat([torch.as_tensor(i) for i in _batch_indices(len(x), settings,
                                                                               int(cfg["max-steps"]))]))
    record_training_data(x[used], y[used])  # defenda: what this update was computed on (no-op outside an audit)
    with torch.no_grad():
        loss = float(nn.functional.cross_entropy(trained(x), y))
    content = RecordDict({"arrays": model_arrays(trained),
                          "metrics": MetricRecord({"num-examples": len(used), "train-loss": loss})})
    return Message(content=content, reply_to=msg)


def _batch_indices(n: int, settings: RoundSettings, max_steps: int) -> list[torch.Tensor]:
    from defenda.federation.client import minibatches

    idx = minibatches(n, settings) if settings.local_epochs > 0 else [torch.arange(n)]
    return idx[:max_steps] if max_steps > 0 else idx


def make_client_app(mods: Sequence[Any] = (), share: bool | None = True) -> ClientApp:
    """The example's ClientApp: ``mods`` (e.g. Flower's ``LocalDpMod``) inside the ground-truth mod.

    ``share=True``: this example simulates clients of public data, so they consent in code; a
    real client uses ``GroundTruthMod()`` and opts in per node (``--node-config``).
    """
    app = ClientApp(mods=[GroundTruthMod(share=share), *mods])  # defenda: records the batch in audit runs
    app.train()(train)
    return app


client_app = make_client_app()

# ---------------------------------------------------------------------------------------- ServerApp


def parse_attack(spec: str) -> tuple[str, dict[str, Any]]:
    """``"geiping:iterations=50:lr=0.1"`` → ``("geiping", {"iterations": 50, "lr": 0.1})`` (values as TOML scalars)."""
    import tomllib

    name, *pairs = spec.strip().split(":")
    params = {k: tomllib.loads(f"v = {v}")["v"] for k, v in (p.split("=", 1) for p in pairs)}
    return name, params


def make_strategy(cfg: dict[str, Any], num_nodes: int) -> Any:
    """FedAvg (no federated evaluation), optionally inside Flower's server-side DP wrapper, audited."""
    from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

    k = max(int(cfg["min-nodes"]), int(num_nodes * float(cfg["fraction-train"])))
    # min-nodes: wait for that many supernodes (Flower's engine registers them while the ServerApp starts)
    strategy: Any = FedAvg(fraction_train=float(cfg["fraction-train"]), fraction_evaluate=0.0,
                           min_train_nodes=int(cfg["min-nodes"]), min_available_nodes=int(cfg["min-nodes"]))
    dp = float(cfg["server-dp-noise"]) > 0

    def wrap_dp(s: Any) -> Any:
        return DifferentialPrivacyServerSideFixedClipping(s, float(cfg["server-dp-noise"]),
                                                          float(cfg["server-dp-clip"]), k) if dp else s

    if not cfg["audit"]:
        return wrap_dp(strategy)

    def audit(s: Any) -> LeakageAudit:
        attacks = [parse_attack(a) for a in str(cfg["attacks"]).split(",") if a]
        knowledge = [k for k in str(cfg["knowledge"]).split(",") if k]
        defense, strength = "none", None
        if float(cfg["local-dp-epsilon"]) > 0:
            defense, strength = "flower-local-dp", float(cfg["local-dp-epsilon"])
        elif dp:
            defense, strength = "flower-central-dp", float(cfg["server-dp-noise"])
        return LeakageAudit(s, out=cfg["out"], model_fn=build_model, task=TASK, task_params=TASK_PARAMS,  # defenda
                            attacks=attacks, knowledge=knowledge, defense=defense, strength=strength,
                            seed=int(cfg["seed"]), keep_updates=bool(cfg.get("keep-updates", False)))

    if cfg["audit-position"] == "inner":  # the audit sees the replies after the server-side clipping
        return wrap_dp(audit(strategy))
    return audit(wrap_dp(strategy))  # the audit sees the raw replies


server_app = ServerApp()


@server_app.main()
def main_server(grid: Grid, context: Context) -> None:
    cfg = config_of(context)
    torch.manual_seed(int(cfg["seed"]))
    strategy = make_strategy(cfg, len(list(grid.get_node_ids())))
    context.state["defenda.strategy"] = ConfigRecord({"repr": repr(strategy)})
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(build_model().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]), train_config=ConfigRecord(
                                {"lr": float(cfg["lr"]), "local-epochs": int(cfg["local-epochs"]),
                                 "batch-size": int(cfg["batch-size"]), "max-steps": int(cfg["max-steps"])}))
    _LAST["strategy"], _LAST["result"] = strategy, result


#: the last in-process run's strategy and result (tests read the audit's cost from it)
_LAST: dict[str, Any] = {}


# ---------------------------------------------------------------------------------------- one command


def run(num_supernodes: int = 3, *, client_app_: ClientApp | None = None, node_config: dict[str, Any] | None = None,
        **run_config: Any) -> dict[str, Any]:
    """Run the example in this process (Flower's ServerApp/ClientApp callables, no Ray)."""
    from defenda_flower.inprocess import run_inprocess

    out = run_inprocess(server_app, client_app_ or client_app, num_supernodes, run_config=run_config,
                        node_config=node_config, seed=int(run_config.get("seed", 0)))
    return {**out, **_LAST}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="defenda-flower-example", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="flower-audit", help="results directory (defenda report reads it)")
    ap.add_argument("--clients", type=int, default=3, help="supernodes")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-steps", type=int, default=0, help="1 = a FedSGD-style round (one step on one batch)")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--attacks", default="spear", help="comma-separated defenda attacks")
    ap.add_argument("--local-dp-epsilon", type=float, default=0.0, help="> 0: the clients run Flower's LocalDpMod")
    ap.add_argument("--server-dp-noise", type=float, default=0.0,
                    help="> 0: Flower's DifferentialPrivacyServerSideFixedClipping with this noise multiplier")
    ap.add_argument("--audit-position", choices=("outer", "inner"), default="outer",
                    help="outer: the audit wraps the DP wrapper (raw replies); inner: inside it (clipped replies)")
    ap.add_argument("--report", action="store_true", help="write the defenda report into OUT/report")
    args = ap.parse_args(argv)
    _check_args(ap, args)
    mods: list[Any] = []
    if args.local_dp_epsilon > 0:
        from flwr.clientapp.mod import LocalDpMod

        mods.append(LocalDpMod(1.0, 2.0, args.local_dp_epsilon, 1e-5))
    res = run(args.clients, client_app_=make_client_app(mods), **{
        "out": args.out, "num-server-rounds": args.rounds, "local-epochs": args.local_epochs,
        "batch-size": args.batch_size, "max-steps": args.max_steps, "lr": args.lr, "attacks": args.attacks,
        "local-dp-epsilon": args.local_dp_epsilon, "server-dp-noise": args.server_dp_noise,
        "audit-position": args.audit_position})
    audit = _find_audit(res.get("strategy"))
    print(f"{res['messages']} messages in {res['seconds']:.1f} s; results in {args.out}")
    if audit is not None:
        for r, c in sorted(audit.cost.items()):
            print(f"round {r}: {c['rows']:.0f} rows for {c['replies']:.0f} replies, audit {c['seconds']:.2f} s")
    if args.report:
        from defenda.harness.report import write_report

        print(write_report(Path(args.out)))
    return 0


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One line and exit code 2 for values the example cannot run (argparse's own convention)."""
    from defenda.plugins import get_plugins

    for name, least in (("clients", 1), ("rounds", 1), ("local_epochs", 1), ("batch_size", 1), ("max_steps", 0)):
        if getattr(args, name) < least:
            ap.error(f"--{name.replace('_', '-')} must be at least {least}, got {getattr(args, name)}")
    if not args.lr > 0:
        ap.error(f"--lr must be positive, got {args.lr}")
    if args.local_dp_epsilon < 0 or args.server_dp_noise < 0:
        ap.error("--local-dp-epsilon and --server-dp-noise must be ≥ 0 (0 = off)")
    known = set(get_plugins().registry.names("attack"))
    unknown = [a for a in args.attacks.split(",") if a.strip() not in known]
    if unknown:
        ap.error(f"unknown attack(s) {unknown} in --attacks; installed: {', '.join(sorted(known))}")


def _find_audit(strategy: Any) -> LeakageAudit | None:
    while strategy is not None:
        if isinstance(strategy, LeakageAudit):
            return strategy
        strategy = getattr(strategy, "strategy", None)
    return None


if __name__ == "__main__":
    sys.exit(main())
