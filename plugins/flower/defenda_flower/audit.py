"""``LeakageAudit``: a Flower strategy wrapper that attacks every client reply it passes on.

It wraps any strategy of Flower's Message API (``flwr.serverapp.strategy``) the way
Flower's own DP wrappers do (``DifferentialPrivacyServerSideFixedClipping(strategy, …)``):

* ``configure_train`` — the wrapped strategy builds the round's messages; the audit keeps,
  per destination node, the arrays and config each message carries (the global model the
  client receives and the local-training settings it is told), and, when ground truth is
  wanted, adds ``"defenda.request-truth": True`` to the train config.
* ``aggregate_train`` — for every reply: the ground-truth record (if a consenting client's
  :class:`~defenda_flower.truth.GroundTruthMod` attached one) is removed; the update is
  ``reply − global`` (:func:`~defenda_flower.arrays.delta_arrays`) as a defenda ``delta``
  with the client's local settings; every configured defenda attack reconstructs from it
  (through :func:`defenda.grants.visible_update`, with the knowledge the audit grants); the
  reconstruction is scored against the recorded batch with defenda's own
  :func:`defenda.harness.trial.score` (success rates and the prior-only baseline included);
  one row per (round, client, attack) goes into a defenda results store
  (``Store(out).add_trial``), so ``defenda report OUT`` draws it like any study. Then the
  replies go on, unchanged, to the wrapped strategy.

What it observes depends on where it sits (recorded in each row's ``extra["observes"]``):

* ``LeakageAudit(DifferentialPrivacyServerSideFixedClipping(FedAvg(), …))`` — the raw
  client replies, before the server clips them: what a curious server receives.
* ``DifferentialPrivacyServerSideFixedClipping(LeakageAudit(FedAvg(), …), …)`` — the
  replies after the wrapper's server-side clipping (the wrapper clips them in place before
  handing them to the strategy it wraps); still before its noise, which is added to the
  aggregate only.

The audit is detected inside a wrapper from the caller of ``aggregate_train`` (a Flower
strategy whose ``strategy`` attribute is the audit).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log
from torch import nn

from defenda.contracts import reconstruction_problems
from defenda.grants import grant_knowledge, visible_update
from defenda.harness.services import load_task
from defenda.harness.store import Store
from defenda.harness.trial import image_arrays, jsonable_info, score
from defenda.harness.utility import now
from defenda.plugins import get_plugins
from defenda_flower.arrays import numpy_of, shared_update
from defenda_flower.truth import REQUEST_KEY, pop_truth

#: Flower's server-side clipping wrappers: an audit inside one of them sees clipped replies
_CLIPPING_WRAPPERS = ("DifferentialPrivacyServerSideFixedClipping", "DifferentialPrivacyServerSideAdaptiveClipping")

AttackSpec = str | tuple[str, dict[str, Any]]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _first(records: Any) -> Any:
    return next(iter(records.values())) if len(records) else None


class LeakageAudit(Strategy):
    """Wrap a Flower strategy: attack each client's reply with defenda, write one row per (round, client, attack).

    :param strategy: the Flower strategy to wrap (``FedAvg(...)``, a DP wrapper, …).
    :param out: the defenda results directory (``defenda report OUT`` reads it).
    :param model_fn: a fresh torch model of the app's architecture (the audit loads the global
        arrays into it: the ``ArrayRecord`` keys must be its ``state_dict`` keys).
    :param task: the defenda task whose input space the client data live in (its public split is the
        attacker's prior, its test split gives ``test_acc``); ``task_params`` its parameters.
    :param attacks: defenda attack names, or ``(name, params)`` pairs.
    :param knowledge: the knowledge flags granted to every attack (``labels``, ``batch_size``, ``lr``, …).
    :param rounds: the server rounds to attack (None: every round).
    :param max_clients: attack at most this many replies per round (None: all), in node-id order.
    :param request_truth: ask the clients for their ground truth (sent only by consenting clients
        running :class:`~defenda_flower.truth.GroundTruthMod`); without it rows hold reconstructions
        and attack statistics, not scores.
    :param defense, strength: how the app protects its clients, for the report's labels
        (e.g. ``"flower-local-dp"``, ε); ``"none"`` for an undefended app.
    :param config_keys: the train-config keys of the client's local settings: ``lr``, ``local-epochs``,
        ``batch-size``, ``max-steps`` (the client's metrics may report ``local-steps`` instead).
    """

    def __init__(self, strategy: Strategy, *, out: str | Path, model_fn: Callable[[], nn.Module],
                 task: str = "digits", task_params: dict[str, Any] | None = None,
                 attacks: Sequence[AttackSpec] = ("spear",), knowledge: Sequence[str] = (),
                 rounds: Iterable[int] | None = None, max_clients: int | None = None, request_truth: bool = True,
                 defense: str = "none", strength: float | None = None, study: str = "flower-audit", seed: int = 0,
                 evaluate: bool = True, save_reconstructions: bool = True, device: str = "cpu",
                 config_keys: dict[str, str] | None = None, keep_updates: bool = False) -> None:
        super().__init__()
        self.strategy = strategy
        self.out = Path(out)
        self.model_fn = model_fn
        self.task = task
        self.task_params = dict(task_params or {})
        self.attacks = [(a, {}) if isinstance(a, str) else (a[0], dict(a[1])) for a in attacks]
        self.knowledge = tuple(knowledge)
        self.rounds = None if rounds is None else set(rounds)
        self.max_clients = max_clients
        self.request_truth = request_truth
        self.defense = defense
        self.strength = strength
        self.study = study
        self.seed = seed
        self.evaluate = evaluate
        self.save_reconstructions = save_reconstructions
        self.device = torch.device(device)
        self.keys = {"lr": "lr", "epochs": "local-epochs", "batch": "batch-size", "steps": "max-steps",
                     **(config_keys or {})}
        self._sent: dict[int, dict[int, tuple[dict[str, np.ndarray], dict[str, Any]]]] = {}
        self._num_nodes: dict[int, int] = {}
        self._accuracy: dict[int, float | None] = {}
        self._data: Any = None
        #: per round: seconds spent attacking and scoring (the audit's cost), and rows written
        self.cost: dict[int, dict[str, float]] = {}
        self.keep_updates = keep_updates
        #: with ``keep_updates``: the update attacked, by (server round, node id)
        self.updates: dict[tuple[int, int], Any] = {}

    def __repr__(self) -> str:
        return f"LeakageAudit({self.strategy!r})"

    # ------------------------------------------------------------------ Flower's Strategy interface

    def summary(self) -> None:
        log(20, "\t├──> defenda LeakageAudit: attacks %s, knowledge %s, results in %s",
            [a for a, _ in self.attacks], list(self.knowledge) or "none", self.out)
        self.strategy.summary()

    def attacked(self, server_round: int) -> bool:
        return self.rounds is None or server_round in self.rounds

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.request_truth:
            config[REQUEST_KEY] = self.attacked(server_round)
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self.attacked(server_round):
            cache: dict[int, dict[str, np.ndarray]] = {}
            sent = {}
            for msg in messages:
                record = _first(msg.content.array_records)
                cfg = _first(msg.content.config_records)
                if record is None:
                    continue
                if id(record) not in cache:
                    cache[id(record)] = numpy_of(record)
                sent[msg.metadata.dst_node_id] = (cache[id(record)], dict(cfg.items()) if cfg is not None else {})
            self._sent[server_round] = sent
            self._num_nodes[server_round] = len(list(grid.get_node_ids()))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        parent = _parent_strategy(self)
        truths = {id(r): pop_truth(r) for r in replies}  # never passed on, attacked round or not
        sent = self._sent.pop(server_round, None)
        if sent is not None:
            t0 = time.perf_counter()
            ok = [r for r in replies if not r.has_error() and r.metadata.src_node_id in sent]
            ok.sort(key=lambda r: r.metadata.src_node_id)
            if self.max_clients is not None:
                ok = ok[: self.max_clients]
            rows = 0
            with Store(self.out) as store:
                for reply in ok:
                    rows += self._audit_reply(store, server_round, reply, sent, truths[id(reply)], parent,
                                              len(replies))
            self.cost[server_round] = {"seconds": time.perf_counter() - t0, "rows": rows, "replies": len(ok)}
        return self.strategy.aggregate_train(server_round, replies)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ the audit of one reply

    def _task_data(self) -> Any:
        if self._data is None:
            self._data = load_task(get_plugins().registry, self.task, self.task_params)[1]
        return self._data

    def _model(self, arrays: dict[str, np.ndarray]) -> nn.Module:
        model = self.model_fn()
        model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()})
        return model.to(self.device)

    def _test_accuracy(self, server_round: int, model: nn.Module, store: Store) -> float | None:
        if not self.evaluate:
            return None
        if server_round not in self._accuracy:
            x, y = self._task_data().test
            if len(x) == 0:
                self._accuracy[server_round] = None
            else:
                model.eval()
                with torch.no_grad():
                    pred = model(x.to(self.device)).argmax(1).cpu()
                self._accuracy[server_round] = float((pred == y).float().mean())
                self._utility_row(server_round, store)
        return self._accuracy[server_round]

    def _utility_key(self, server_round: int) -> str:
        return _digest("flower-utility", self.study, self.defense, self.strength, self.seed, server_round)

    def _utility_row(self, server_round: int, store: Store) -> None:
        # one row per round: the accuracy of the global model the clients of this round receive, at
        # defenda's convention (round r - 1 = the model after r - 1 aggregations)
        store.add_utility({"key": self._utility_key(server_round), "task": self.task, "defense": self.defense,
                           "strength": self.strength, "params": {"task": self.task_params}, "seed": self.seed,
                           "status": "ok", "reason": "", "test_acc": self._accuracy[server_round],
                           "extra": {"accuracy": [[server_round - 1, self._accuracy[server_round]]],
                                     "source": "defenda-flower LeakageAudit"},
                           "finished_at": now()})

    def _audit_reply(self, store: Store, server_round: int, reply: Message, sent: dict[int, Any],
                     truth: tuple[np.ndarray, np.ndarray] | None, parent: Strategy | None, replies: int) -> int:
        plugins = get_plugins()
        reg = plugins.registry
        data = self._task_data()
        node = reply.metadata.src_node_id
        global_arrays, cfg = sent[node]
        got = numpy_of(_first(reply.content.array_records))
        delta = {k: np.subtract(got[k], global_arrays[k]) for k in got}
        metrics = dict((_first(reply.content.metric_records) or {}).items())
        num_examples = int(metrics.get("num-examples", 0) or 0)
        lr = cfg.get(self.keys["lr"])
        epochs = int(cfg.get(self.keys["epochs"], 1) or 1)
        b = int(cfg.get(self.keys["batch"], 0) or 0)
        max_steps = int(cfg.get(self.keys["steps"], 0) or 0)
        n = len(truth[1]) if truth is not None else num_examples
        full = epochs * (-(-n // b)) if b > 0 else epochs
        steps = int(metrics.get("local-steps", 0) or (min(full, max_steps) if max_steps > 0 else full))
        if steps == 1:  # FedSGD-style: one step on the whole recorded batch
            settings = {"local_steps": 1, "local_epochs": 0, "local_batch_size": 0}
        elif max_steps == 0 or steps == full:
            settings = {"local_steps": steps, "local_epochs": epochs, "local_batch_size": b}
        else:
            settings = {"local_steps": steps, "local_epochs": 0, "local_batch_size": 0}
        model = self._model(global_arrays)
        test_acc = self._test_accuracy(server_round, model, store)
        observes = (f"the replies after {type(parent).__name__}'s server-side clipping (before its noise, which "
                    "goes on the aggregate)" if parent is not None and type(parent).__name__ in _CLIPPING_WRAPPERS
                    else "the raw client replies, as the server receives them")
        federation = {"framework": f"flower {_flwr_version()}", "strategy": _chain(self), "update": "delta",
                      "clients": self._num_nodes.get(server_round), "clients_per_round": len(sent),
                      "local_epochs": epochs, "local_batch_size": b, "max_steps": max_steps, "lr": lr,
                      "sampling": "the strategy's", "partition": "the app's"}
        update = shared_update(delta, model, batch_size=n, lr=None if lr is None else float(lr),
                               local_steps=settings["local_steps"], local_epochs=settings["local_epochs"],
                               local_batch_size=settings["local_batch_size"])
        if self.keep_updates:
            self.updates[(server_round, node)] = update
        written = 0
        for name, params in self.attacks:
            t_trial = time.perf_counter()
            key = _digest(self.study, self.defense, self.strength, self.seed, server_round, node, name, params)
            row: dict[str, Any] = {
                "key": key, "study": self.study, "task": self.task, "attack": name, "defense": self.defense,
                "strength": self.strength, "batch_size": n, "seed": self.seed, "server": "honest",
                "knowledge": list(self.knowledge), "versions": plugins.versions(), "round": server_round,
                "client": node & (2 ** 63 - 1), "num_samples": n, "aggregation_size": 1,
                "test_acc": test_acc, "utility_key": self._utility_key(server_round) if self.evaluate else None,
                "params": {"task": self.task_params, "attack": params, "defense": {}, "update": "delta", "lr": lr,
                           "federation": federation, "target": "client"},
            }
            extra: dict[str, Any] = {"node_id": str(node), "server_round": server_round, "observes": observes,
                                     "num_examples_reported": num_examples, "scored": truth is not None,
                                     "replies_in_round": replies, "observation": {"local_steps": steps, "clients": 1},
                                     "noise_position": _noise_position(self.strategy, parent)}
            arrays = None
            try:
                entry = reg.get("attack", name)
                attack = entry.cls(params)
                y_known = torch.as_tensor(truth[1]) if truth is not None else torch.zeros(n, dtype=torch.long)
                reason = self._skip_reason(attack, data, truth)
                knowledge = grant_knowledge(self.knowledge, data, model, y_known.to(self.device),
                                            lr=float(lr) if lr is not None else 0.1, device=self.device,
                                            seed=self.seed)
                reason = reason or attack.check(model, data, knowledge)
                if reason:
                    row.update(status="skipped", reason=f"{name}: {reason}")
                else:
                    model.eval()
                    torch.manual_seed(self.seed + 1)
                    t0 = time.perf_counter()
                    recon = attack.reconstruct(visible_update(update, knowledge), model, knowledge)
                    row["attack_seconds"] = time.perf_counter() - t0
                    problems = reconstruction_problems(recon, data.input_shape)
                    if problems:
                        raise ValueError(problems[0])
                    extra["attack_info"] = jsonable_info(recon.info)
                    if truth is not None:
                        x = torch.as_tensor(truth[0])
                        values, scored, matched, xm, _ = score(plugins, x, torch.as_tensor(truth[1]), recon, data)
                        row.update(values)
                        extra.update(scored)
                        if self.save_reconstructions:
                            arrays = image_arrays(data, xm, matched)
                    else:
                        row["reason"] = "not scored: no ground truth from this client (GroundTruthMod not " \
                                        "installed, or the client did not consent)"
                        if self.save_reconstructions:
                            _save_unscored(self.out, key, recon, data)
                    row["status"] = "ok"
                    row.setdefault("reason", "")
            except Exception as exc:  # one failed attack is a row, never a failed Flower round
                row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                           error_type=type(exc).__name__, plugin=name)
                extra["traceback"] = traceback.format_exc()[-4000:]
            row["extra"] = extra
            row["trial_seconds"] = time.perf_counter() - t_trial
            row["finished_at"] = now()
            store.add_trial(row, arrays)
            written += 1
        return written

    def _skip_reason(self, attack: Any, data: Any, truth: Any) -> str | None:
        req = attack.requires
        if req.server == "malicious":
            return "needs a malicious server (it chooses the weights); the audit observes the app's own model"
        if "delta" not in req.updates:
            return "needs a gradient update; a Flower client sends weights (a delta after local training)"
        missing = sorted(req.knowledge - set(self.knowledge))
        if missing:
            return f"needs attacker knowledge {missing} (LeakageAudit(knowledge=...))"
        if data.kind not in req.task_kinds:
            return f"does not handle {data.kind} tasks"
        if truth is None and {"labels", "batch_size"} & set(self.knowledge):
            return "labels / batch_size knowledge come from the recorded ground truth, which this client did not send"
        return None


def _parent_strategy(audit: LeakageAudit) -> Strategy | None:
    """The Flower strategy that called ``audit.aggregate_train`` (a wrapper around the audit), if any."""
    frame = inspect.currentframe()
    try:
        f = frame.f_back.f_back if frame and frame.f_back else None
        while f is not None:
            caller = f.f_locals.get("self")
            if caller is not audit:
                return caller if isinstance(caller, Strategy) and getattr(caller, "strategy", None) is audit else None
            f = f.f_back
        return None
    finally:
        del frame


def _chain(strategy: Any) -> str:
    names = []
    while strategy is not None:
        names.append(type(strategy).__name__)
        strategy = getattr(strategy, "strategy", None)
    return " > ".join(names)


def _noise_position(inner: Any, parent: Any) -> str:
    """Where Flower's central DP noise enters relative to what the audit observes ("after": on the
    aggregate, which the audit never sees; "" without central DP below or above the audit)."""
    s = inner
    while s is not None:
        if "DifferentialPrivacy" in type(s).__name__:
            return "after"
        s = getattr(s, "strategy", None)
    return "after" if parent is not None and "DifferentialPrivacy" in type(parent).__name__ else ""


def _flwr_version() -> str:
    import importlib.metadata as md

    return md.version("flwr")


def _save_unscored(out: Path, key: str, recon: Any, data: Any) -> None:
    """A reconstruction without ground truth: ``OUT/flower-unscored/<key>.npz`` (not in the report's grids)."""
    folder = out / "flower-unscored"
    folder.mkdir(exist_ok=True)
    inputs = recon.inputs.detach().cpu()
    if data.kind == "image":
        inputs = data.to_unit(inputs).clamp(0, 1)
    arrays = {"recon": inputs.numpy().astype(np.float32)}
    if recon.labels is not None:
        arrays["labels"] = recon.labels.detach().cpu().numpy()
    np.savez_compressed(folder / f"{key}.npz", **arrays)
