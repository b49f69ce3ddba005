"""One federated training run: R rounds of client sampling, defended client updates, aggregation.

The run is the experiment every attack of a study reads from (reference:
``reference/federation.md``). Each round r:

1. K clients are sampled (:func:`defenda.federation.sampling.sample_clients`);
2. each computes its update at the broadcast model θ_r through the defense —
   FedSGD: the gradient of one mini-batch of b samples drawn from its data
   (Poisson-sampled at rate min(1, b/n_k) when the defense's accounting assumes
   it, :attr:`defenda.Defense.poisson_sampling`: DP-SGD);
   FedAvg: E local epochs over its data in mini-batches of b;
3. the server observes every client's update, or only their aggregate when a
   defense hides them (secure aggregation);
4. the aggregate (weights p_k ∝ n_k unless the defense says otherwise), after
   any server-side post-processing (central DP noise), is applied:
   θ_{r+1} = θ_r − η_s·η_l·g (FedSGD) or θ_r + η_s·Δ (FedAvg).

At the attack rounds the run keeps an :class:`Observation`: θ_r, exactly what
the server observed, and per contributing client the ground truth and the
random state it used — for scoring, and so that a malicious server's model
can be put through the same client computation. Never shown to attacks.

Randomness: one generator per purpose (partition, sampling per round, each
client's batch and defense noise per round, aggregation per round), all
derived from the run's seed, so the same seed reproduces every draw. With one
client the round-0 batch and noise are drawn exactly as the single-client
protocol draws them (seed ``10_000 + seed``), so ``clients = 1`` at round 0
attacks the very update that protocol attacks — except under a defense with
Poisson batches (DP-SGD), which the single-client protocol still draws at a
fixed size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from defenda.federation.accounting import PrivacyLedger, client_level_epsilon
from defenda.federation.aggregation import apply_step, weighted_sum
from defenda.federation.partition import partition, partition_hash
from defenda.federation.sampling import sample_clients
from defenda.federation.settings import FederationSettings
from defenda.federation.training import accuracy
from defenda.records import FederationPlan, RoundSettings, SharedUpdate, TaskData

if TYPE_CHECKING:
    from defenda.interfaces import Defense


@dataclass
class ClientRound:
    """One client's part in an observed round (ground truth: for scoring and replay only).

    :ivar samples: n_k, the size of the client's data.
    :ivar x, y: what the client trained on: its FedSGD batch (the very draw of the round; under
        Poisson sampling of any size, possibly empty), or its whole data for FedAvg.
    :ivar noise_state: the state of the client's generator just before ``client_update``.
    """

    client: int
    samples: int
    x: torch.Tensor
    y: torch.Tensor
    settings: RoundSettings
    noise_state: torch.Tensor
    ledger_entries: int = 0


@dataclass
class ObservedUnit:
    """One thing the server observed: a client's update, or the aggregate of ``clients``."""

    clients: list[int]
    update: SharedUpdate


@dataclass
class Observation:
    """What the server held at an attack round r (see the module docstring)."""

    round: int
    model_state: dict[str, torch.Tensor]
    sampled: list[int]
    weights: list[float]
    clients: dict[int, ClientRound]
    units: list[ObservedUnit]
    aggregate_state: torch.Tensor
    hidden: bool

    def truth(self, unit: ObservedUnit) -> tuple[torch.Tensor, torch.Tensor]:
        """The samples behind ``unit`` (the union of its clients')."""
        xs = [self.clients[k].x for k in unit.clients]
        ys = [self.clients[k].y for k in unit.clients]
        return torch.cat(xs), torch.cat(ys)


@dataclass
class RunResult:
    """What a training run yields: utility per round, ε per client, the observations."""

    accuracy: list[tuple[int, float]]
    observations: list[Observation]
    ledger: PrivacyLedger
    partition_hash: str
    client_sizes: list[int]
    client_epsilon_noise: float | None = None
    skipped_rounds: list[int] = field(default_factory=list)

    @property
    def test_acc(self) -> float:
        return self.accuracy[-1][1] if self.accuracy else float("nan")


#: from this many clients in a round on, FedSGD clients are computed in one vectorised pass: below it the
#: vmap set-up costs more than it saves (digits MLP, `benchmarks/bench_federation.py`: break-even at K ≈ 5)
BATCHED_MIN_CLIENTS = 6


def client_seed(seed: int, round_: int, client: int, clients: int) -> int:
    """The seed of client ``client``'s generator in round ``round_`` (batch draw, then defense noise).

    Round 0 of client 0 uses ``10_000 + seed``, the single-client protocol's seed.
    """
    return 10_000 + seed + 1_000_003 * (round_ * clients + client)


def _aggregate_seed(seed: int, round_: int) -> int:
    return 50_000 + seed + 1_000_033 * round_


def plan_of(fs: FederationSettings) -> FederationPlan:
    """What a defense is told about the federation ``fs``."""
    return FederationPlan(clients=fs.clients, clients_per_round=fs.clients_per_round, rounds=fs.rounds,
                          sampling=fs.sampling, delta=fs.delta)


def client_batch(fs: FederationSettings, b: int, data_idx: torch.Tensor, gen: torch.Generator,
                 round_: int, client: int, seed: int, *, poisson: bool = False) -> tuple[torch.Tensor, RoundSettings]:
    """The indices client ``client`` trains on in ``round_`` and its local settings.

    FedSGD: ``min(b, n_k)`` samples without replacement (from ``gen``), or with ``poisson``
    each of the n_k samples independently with probability q = min(1, b/n_k) (from ``gen``:
    one uniform per sample, as Opacus' ``UniformWithReplacementSampler``), the rate the
    sample-level ledger accounts; that batch may be empty or larger than b. FedAvg: all its data.
    """
    n = len(data_idx)
    if fs.update == "gradient":
        if poisson:
            # the accountant's Poisson-subsampled Gaussian is only the mechanism that runs if the
            # draw is Poisson too; q·n_k = min(b, n_k) is the expected size in the settings
            idx = data_idx[torch.rand(n, generator=gen) < min(1.0, b / n)] if n else data_idx
        else:
            idx = data_idx[torch.randperm(n, generator=gen)[:min(b, n)]]
        return idx, local_settings(fs, b, n)
    return data_idx, local_settings(fs, b, n, order_seed=client_seed(seed, round_, client, fs.clients) + 7)


def local_settings(fs: FederationSettings, b: int, n: int, order_seed: int = 0) -> RoundSettings:
    """How a client of ``n`` samples computes its update in federation ``fs`` (mini-batch ``b``).

    FedSGD: ``local_batch_size`` is the size of the client's batch, min(b, n) — under Poisson
    sampling its expected size, by which DP-SGD divides (Opacus' ``expected_batch_size``) and
    at whose rate its ledger accounts.
    """
    if fs.update == "gradient":
        return RoundSettings(kind="gradient", lr=fs.lr, local_batch_size=min(b, n), client_samples=n)
    return RoundSettings(kind="delta", lr=fs.lr, local_epochs=fs.local_epochs, local_batch_size=b,
                         order_seed=order_seed, client_samples=n)


def client_updates(model: nn.Module, defense: Defense, data: TaskData, parts: list[torch.Tensor],
                   sampled: list[int], fs: FederationSettings, b: int, round_: int, seed: int,
                   device: torch.device, keep: bool) -> tuple[list[SharedUpdate], dict[int, ClientRound]]:
    """Every sampled client's defended update at the current global ``model``.

    Clients whose defense only post-processes the honest FedSGD gradient are computed in one
    vectorised pass (:func:`defenda.federation.client.batched_gradients`) when their batches
    have equal, non-zero sizes; the defense then transforms each client's gradient with that
    client's generator, exactly as its ``client_update`` would. (DP-SGD, the defense with
    Poisson batches of varying size, computes its own update and never takes that path.)
    """
    x_train, y_train = data.train
    model.train()
    draws = []
    poisson = fs.update == "gradient" and bool(defense.poisson_sampling)
    for k in sampled:
        gen = torch.Generator().manual_seed(client_seed(seed, round_, k, fs.clients))
        idx, settings = client_batch(fs, b, parts[k], gen, round_, k, seed, poisson=poisson)
        draws.append((k, gen, idx, settings, gen.get_state()))
    chain = _transform_chain(defense)
    sizes = {len(idx) for _, _, idx, _, _ in draws}
    if fs.update == "gradient" and chain is not None and len(draws) >= BATCHED_MIN_CLIENTS and len(sizes) == 1 \
            and 0 not in sizes and not any(True for _ in model.buffers()):
        updates = _batched(model, chain, draws, x_train, y_train, fs, device)
    else:
        updates = [defense.client_update(model, x_train[idx].to(device), y_train[idx].to(device), settings, gen)
                   for _, gen, idx, settings, _ in draws]
    kept = {k: ClientRound(k, len(parts[k]), x_train[idx], y_train[idx], settings, state)
            for k, _, idx, settings, state in draws} if keep else {}
    return updates, kept


def _transform_chain(defense: Defense) -> list[Defense] | None:
    """The defenses whose ``transform`` make up ``defense.client_update``, when it is nothing else."""
    from defenda.compose import ComposedDefense
    from defenda.interfaces import Defense as Base

    if isinstance(defense, ComposedDefense):
        return defense.parts if type(defense.parts[0]).client_update is Base.client_update else None
    return [defense] if type(defense).client_update is Base.client_update else None


def _batched(model: nn.Module, chain: list[Defense], draws: list[Any], x_train: torch.Tensor,
             y_train: torch.Tensor, fs: FederationSettings, device: torch.device) -> list[SharedUpdate]:
    from defenda.federation.client import batched_gradients

    xs = torch.stack([x_train[idx] for _, _, idx, _, _ in draws]).to(device)
    ys = torch.stack([y_train[idx] for _, _, idx, _, _ in draws]).to(device)
    grads = batched_gradients(model, xs, ys)
    names = [n for n, _ in model.named_parameters()]
    out = []
    for j, (_, gen, idx, _, _) in enumerate(draws):
        update = SharedUpdate(tensors=[g[j] for g in grads], names=names, kind="gradient", batch_size=len(idx),
                              lr=fs.lr)
        for part in chain:
            update = part.transform(update, gen)
        out.append(update)
    return out


def observe_round(defense: Defense, updates: list[SharedUpdate], sampled: list[int], weights: list[float],
                  gen: torch.Generator) -> tuple[list[ObservedUnit], SharedUpdate]:
    """What the server observes of the round, and the aggregate before server-side post-processing."""
    if defense.hides_client_updates:
        aggregate = defense.secure_aggregate(updates, weights, gen)
        return [ObservedUnit(list(sampled), aggregate)], aggregate
    units = [ObservedUnit([k], u) for k, u in zip(sampled, updates)]
    return units, weighted_sum(updates, weights)


def run_federation(data: TaskData, build_model: Callable[[], nn.Module], defense: Defense,
                   fs: FederationSettings, *, seed: int, device: torch.device,
                   batch_size: int | None = None) -> RunResult:
    """Train the global model for ``fs.rounds`` rounds under ``defense``; see the module docstring.

    :param build_model: a fresh model (called once, after ``torch.manual_seed(seed)``).
    :param batch_size: the clients' b before the defense changes it (default ``fs.local_batch_size``).
    """
    b = defense.client_batch_size(batch_size or fs.local_batch_size)
    labels = data.train[1].numpy()
    parts = [torch.as_tensor(p, dtype=torch.long) for p in
             partition(labels, fs.clients, fs.partition, seed=seed, alpha=fs.alpha,
                       shards_per_client=fs.shards_per_client)]
    torch.manual_seed(seed)
    model = build_model().to(device)
    defense.join_federation(plan_of(fs))
    ledger = PrivacyLedger()
    result = RunResult([], [], ledger, partition_hash([p.numpy() for p in parts]), [len(p) for p in parts],
                       defense.client_noise_multiplier())
    observed = set(fs.observed_rounds)
    for r in range(fs.rounds):
        sampled = sample_clients(fs.clients, fs.clients_per_round, r, seed=seed, mode=fs.sampling)
        if sampled:
            _one_round(model, defense, data, parts, sampled, fs, b, r, seed, device, r in observed, result)
        else:
            result.skipped_rounds.append(r)  # Poisson sampling drew nobody: the model stays
        if (r + 1) % fs.eval_every == 0 or r == fs.rounds - 1:
            result.accuracy.append((r, accuracy(model, data, device)))
    return result


def _one_round(model: nn.Module, defense: Defense, data: TaskData, parts: list[torch.Tensor], sampled: list[int],
               fs: FederationSettings, b: int, r: int, seed: int, device: torch.device, keep: bool,
               result: RunResult) -> None:
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if keep else {}
    updates, kept = client_updates(model, defense, data, parts, sampled, fs, b, r, seed, device, keep)
    for k, u in zip(sampled, updates):
        settings = local_settings(fs, b, len(parts[k]))
        # FedSGD: the batch size the draw was made at (its expected size under Poisson sampling),
        # not the realised one, which would put a random rate into the ledger
        size = settings.local_batch_size if fs.update == "gradient" else u.batch_size
        entry = defense.sample_ledger_entry(settings, size)
        if entry is not None:
            result.ledger.add(k, entry)
        if keep:
            kept[k].ledger_entries = result.ledger.participations(k)
    weights = defense.aggregation_weights([len(parts[k]) for k in sampled])
    gen = torch.Generator().manual_seed(_aggregate_seed(seed, r))
    agg_state = gen.get_state()
    units, aggregate = observe_round(defense, updates, sampled, weights, gen)
    step = defense.server_update(aggregate, len(updates), gen)
    if keep:
        result.observations.append(Observation(r, state, list(sampled), list(weights), kept, units, agg_state,
                                               defense.hides_client_updates))
    apply_step(model, step, client_lr=fs.lr, server_lr=fs.server_lr)


def replay_unit(obs: Observation, unit: ObservedUnit, model: nn.Module, defense: Defense,
                fs: FederationSettings) -> SharedUpdate:
    """What the server would have observed of ``unit`` had it sent ``model`` instead of θ_r
    (a malicious server): the same clients, data, batch order, defense and random draws."""
    defense.join_federation(plan_of(fs))
    model.train()
    updates = []
    for k in unit.clients:
        c = obs.clients[k]
        gen = torch.Generator()
        gen.set_state(c.noise_state)
        device = next(model.parameters()).device
        updates.append(defense.client_update(model, c.x.to(device), c.y.to(device), c.settings, gen))
    if not obs.hidden:
        return updates[0]
    weights = [obs.weights[obs.sampled.index(k)] for k in unit.clients]
    gen = torch.Generator()
    gen.set_state(obs.aggregate_state)
    return defense.secure_aggregate(updates, weights, gen)


def run_epsilon(result: RunResult, defense: Defense, fs: FederationSettings,
                upto_round: int | None = None, client: int | None = None) -> dict[str, Any] | None:
    """The DP accounting of a run (None without a DP defense): ε at the end (worst client), and,
    for ``client`` at ``upto_round``, that client's ε after that round.

    Sample level: each client's own ledger of (σ, q, steps) per participation (Opacus).
    Client level (DP-FedAvg): z at rate q = K/N over the rounds run (Opacus' Poisson
    analysis; no amplification against the server itself, which picks the clients).
    """
    accountant = defense.ledger_accountant()
    if result.client_epsilon_noise is not None:
        z, q = result.client_epsilon_noise, fs.clients_per_round / fs.clients
        out = {"level": "client", "accountant": "rdp", "delta": fs.delta,
               "epsilon": client_level_epsilon(z, q, fs.rounds, fs.delta)}
        if upto_round is not None:
            out["epsilon_round"] = client_level_epsilon(z, q, upto_round + 1, fs.delta)
        return out
    if not any(result.ledger.entries(k) for k in range(fs.clients)):
        return None
    from defenda.federation.accounting import ledger_accounting

    per_client = [ledger_accounting(result.ledger.entries(k), fs.delta, accountant) for k in result.ledger.clients()]
    # the accountant that produced each ε (PRV falls back to RDP where its grid would be too large)
    used = sorted({e.accountant for e in per_client})
    out = {"level": "sample", "accountant": "+".join(used), "delta": fs.delta,
           "epsilon": max(e.value for e in per_client)}
    if client is not None:
        out["epsilon_client"] = result.ledger.epsilon(client, fs.delta, accountant)
    return out
