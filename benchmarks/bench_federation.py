"""Client steps per second of a federated training run against a bare PyTorch loop (a benchmark, not a test).

Both train the same federation (digits, MLP, N clients, K per round, FedSGD with
batches of b, R rounds, no defense); the bare loop computes the clients one after
another with ``loss.backward()`` and averages, which is what a hand-written
simulation does. defenda computes a round's clients in one vectorised pass
(``torch.func.vmap``) when the defense allows it, and also evaluates the test
accuracy every ``eval_every`` rounds (included in its time). One run, medians of
``--repeats`` timings, and the ratio.

    python benchmarks/bench_federation.py --rounds 100 --clients 10 --per-round 5 --batch 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from defenda.compose import make_defense
from defenda.federation.partition import partition
from defenda.federation.run import run_federation
from defenda.federation.sampling import sample_clients
from defenda.federation.settings import FederationSettings
from defenda.harness.services import load_task
from defenda.plugins import get_plugins


def bare_loop(task, data, fs: FederationSettings, seed: int) -> float:
    """A hand-written FedSGD simulation: clients one after another, weighted mean, SGD step."""
    x, y = data.train
    parts = [torch.as_tensor(p) for p in partition(y.numpy(), fs.clients, fs.partition, seed=seed, alpha=fs.alpha)]
    torch.manual_seed(seed)
    model = task.build_model(data)
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    for r in range(fs.rounds):
        sampled = sample_clients(fs.clients, fs.clients_per_round, r, seed=seed)
        total = sum(len(parts[k]) for k in sampled)
        agg = [torch.zeros_like(p) for p in params]
        for k in sampled:
            idx = parts[k][torch.randperm(len(parts[k]), generator=gen)[:fs.local_batch_size]]
            grads = torch.autograd.grad(F.cross_entropy(model(x[idx]), y[idx]), params)
            for a, g in zip(agg, grads):
                a.add_(g, alpha=len(parts[k]) / total)
        with torch.no_grad():
            for p, a in zip(params, agg):
                p.sub_(fs.lr * a)
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    reg = get_plugins().registry
    task, data = load_task(reg, "digits", {"model": "mlp", "widths": [256]})
    fs = FederationSettings(clients=args.clients, clients_per_round=args.per_round, rounds=args.rounds,
                            local_batch_size=args.batch, eval_every=args.rounds, attack_rounds=(0,))
    steps = args.rounds * args.per_round
    times: dict[str, list[float]] = {"defenda": [], "bare loop": []}
    for i in range(args.repeats):
        t = time.perf_counter()
        run_federation(data, lambda: task.build_model(data), make_defense(reg, "none", {}), fs, seed=i,
                       device=torch.device("cpu"))
        times["defenda"].append(time.perf_counter() - t)
        t = time.perf_counter()
        bare_loop(task, data, fs, seed=i)
        times["bare loop"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"digits MLP-256, N={args.clients}, K={args.per_round}, b={args.batch}, R={args.rounds}: "
          f"{steps} client steps, {args.threads} thread(s), median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:10s} {v:7.3f} s   {steps / v:9.0f} client-steps/s")
    print(f"  defenda / bare loop speed: {med['bare loop'] / med['defenda']:.2f}x")


if __name__ == "__main__":
    main()
