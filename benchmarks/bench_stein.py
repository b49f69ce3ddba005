"""Benchmark of the ``stein`` attack (not a timed test): medians over repeats on real digits.

Setting: scikit-learn digits (d = 64) in model space (scalar standardisation over the
training split), B = 4, tanh, m = 1e5 by default, one CPU thread. Each repeat draws a
fresh attacker model and batch. Reported, as medians:

* ``prepare``: drawing the attacker's model (``prepare_model``);
* ``client``: the client's FedSGD gradient on it (``defenda.federation.client.compute_update``);
* ``span``, ``estimator``, ``decomposition``, ``sign_scale``: the stages of ``reconstruct``
  (from the ``t_*`` entries of ``Reconstruction.info``), ``other`` the rest of ``reconstruct``;
* ``attack``: ``reconstruct`` wall time with ``refine_steps = 0`` (goal ≤ 1 s);
* ``refinement``: the extra Levenberg–Marquardt gradient matching (``--refine-steps``);
* quality: mean |cos| after Hungarian matching on |cos|, max relative error of the
  norms, label accuracy — with and without refinement.

Usage::

    python benchmarks/bench_stein.py [--width 100000] [--activation tanh] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from scipy.optimize import linear_sum_assignment

from defenda import Knowledge, Reconstruction, TaskData
from defenda.data import load_digits_task
from defenda.federation.client import compute_update
from defenda_attacks.stein import Stein

T = TypeVar("T")
STAGES = ("span", "estimator", "decomposition", "sign_scale", "refinement")


def quality(x: torch.Tensor, y: torch.Tensor, rec: Reconstruction) -> dict[str, float]:
    a = x.reshape(len(x), -1).double()
    b = rec.inputs.reshape(len(rec.inputs), -1).double()
    c = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    r, k = linear_sum_assignment(-c.abs().numpy())
    rel = (b[k] - a[r]).norm(dim=1) / a[r].norm(dim=1)
    return {
        "mean_abs_cos": float(c[r, k].abs().mean()),
        "min_signed_cos": float(c[r, k].min()),
        "max_rel_err": float(rel.max()),
        "label_acc": float((rec.labels[k] == y[r]).double().mean()) if rec.labels is not None else float("nan"),
    }


def _timed(fn: Callable[..., T], *args: Any) -> tuple[T, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def one_repeat(rep: int, data: TaskData, plain: Stein, refined: Stein, batch: int) -> dict[str, float]:
    """One fresh attacker model and batch: the timings and the quality of both attacks."""
    torch.manual_seed(rep)
    model, t_prep = _timed(plain.prepare_model, torch.nn.Linear(1, 1), data)
    idx = torch.randperm(len(data.train[0]), generator=torch.Generator().manual_seed(rep))[:batch]
    x, y = data.train[0][idx], data.train[1][idx]
    update, t_client = _timed(compute_update, model, x, y)
    kn = Knowledge(space=data.space)
    rec, t_attack = _timed(plain.reconstruct, update, model, kn)
    rec2, t_refined = _timed(refined.reconstruct, update, model, kn)
    tm = {k: rec.info[f"t_{k}"] for k in STAGES}
    row = {"prepare": t_prep, "client": t_client, **{k: v for k, v in tm.items() if k != "refinement"}}
    row["other"] = t_attack - sum(tm.values())
    row["attack"] = t_attack
    row["refinement"] = rec2.info["t_refinement"]
    row["attack_refined"] = t_refined
    row.update({f"q_{k}": v for k, v in quality(x, y, rec).items()})
    row.update({f"qr_{k}": v for k, v in quality(x, y, rec2).items()})
    return row


def print_report(med: dict[str, float], args: argparse.Namespace, m: int) -> None:
    print(
        f"stein: digits d=64, B={args.batch}, {args.activation}, m={m}, {args.threads} thread(s), "
        f"median of {args.repeats} repeats"
    )
    print("time (s):")
    for k in ("prepare", "client", "span", "estimator", "decomposition", "sign_scale", "other", "attack"):
        print(f"  {k:<14} {med[k]:8.4f}" + ("   <- reconstruct total (goal <= 1 s)" if k == "attack" else ""))
    print(
        f"  {'refinement':<14} {med['refinement']:8.4f}   (+ up to {args.refine_steps} LM iterations; total "
        f"{med['attack_refined']:.4f})"
    )
    print("quality (median over repeats):")
    for pre, name in (("q_", "tensor step"), ("qr_", "refined")):
        print(
            f"  {name:<12} mean|cos| {med[pre + 'mean_abs_cos']:.6f}  min signed cos {med[pre + 'min_signed_cos']:.6f}"
            f"  max rel err {med[pre + 'max_rel_err']:.2e}  label acc {med[pre + 'label_acc']:.2f}"
        )
    goal = "met" if med["attack"] <= 1.0 else "NOT met"
    print(f"goal (reconstruct <= 1 s at m = {m}): {goal}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=1e5)
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--refine-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print the medians as JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_task()
    m = int(args.width)
    plain = Stein(width=m, activation=args.activation)
    refined = Stein(width=m, activation=args.activation, refine_steps=args.refine_steps)
    # the first repeat warms up and is dropped
    rows = [one_repeat(rep, data, plain, refined, args.batch) for rep in range(args.repeats + 1)][1:]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    if args.json:
        print(json.dumps(med, indent=1))
    else:
        print_report(med, args, m)


if __name__ == "__main__":
    main()
