"""GIAS / GIML benchmark on the embedded digits (the numbers quoted in the README).

Sections (``--sections``, default all):

* ``prior`` — wall time of the GIAS prior's GAN training on the digits public split
  (``--repeats`` runs, median), and of GIML's meta-training (40 rounds, once).
* ``trial`` — attack seconds of a default-study GIAS trial (digits, B = 1,
  knowledge batch_size + public_data, no defense) run through ``defenda.trial.run_trial``,
  prior already cached; median over 3 seeds; with the default study's digits model and
  with the SmallCNN.
* ``b16`` — B = 16, no defense, equal budgets of 1000 iterations: Geiping (1000),
  GIAS (400 latent + 600 parameter), latent-only GI-z (1000); median PSNR over seeds.
* ``prune`` — the same at B = 4 under 90% pruning (the ``prune`` defense; the attacks
  compare on the kept coordinates).
* ``giml`` — B = 4, 90% pruning: GIAS with the GIML generator after 0 (untrained), 10,
  20, 40 and 80 observed rounds, and with the GAN prior for reference.

Trials follow ``defenda.trial``: ``torch.manual_seed(seed)`` before the model, the batch
drawn with ``Generator(10_000 + seed)`` from the train split, ``manual_seed(seed + 1)``
before the attack; labels and batch size known; PSNR after one-to-one matching. One
thread (``torch.set_num_threads(1)``).

Usage::

    .venv/bin/python benchmarks/bench_gias.py [--seeds 10] [--sections b16,prune] [--cache DIR] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from defenda import Knowledge
from defenda.data import load_digits_task
from defenda.federation import GradientHistory
from defenda.models import SmallCNN
from defenda.testing.trials import harness_trial
from defenda_attacks.geiping import Geiping
from defenda_attacks.gias import GIAS
from defenda_attacks.giml import GIML
from defenda_defenses.prune import Prune

BUDGET = 1000


def trial(data: Any, attack: Any, seed: int, batch: int, cache: str, prune: float = 0.0) -> tuple[float, float]:
    """(batch PSNR, attack seconds) of one harness-style trial on the digits SmallCNN."""
    out = harness_trial(data, lambda: SmallCNN(1, 8, 10), attack, seed=seed, batch=batch,
                        knowledge={"public": data.public, "history": GradientHistory(*data.public, lr=0.1),
                                   "cache_dir": cache},
                        transform=Prune(fraction=prune).transform if prune else None)
    return out.psnr, out.seconds


def compare(data: Any, attacks: dict[str, Any], seeds: list[int], batch: int, cache: str,
            prune: float = 0.0) -> dict[str, Any]:
    out = {}
    for name, attack in attacks.items():
        values = []
        for s in seeds:
            value, _ = trial(data, attack, s, batch, cache, prune)
            values.append(round(value, 2))
            print(f"  {name:<28} seed {s}: {value:6.2f} dB", file=sys.stderr, flush=True)
        out[name] = {"median": round(statistics.median(values), 2), "psnr": values}
    return out


def table(title: str, results: dict[str, Any]) -> str:
    lines = [f"### {title}", "", "| attack | median PSNR (dB) | per seed |", "|---|---:|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['median']:.2f} | {' '.join(f'{v:.1f}' for v in r['psnr'])} |")
    return "\n".join(lines)


def section_prior(data: Any, repeats: int, cache: str) -> dict[str, Any]:
    from defenda_attacks import _generators

    times = []
    for _ in range(repeats):
        _generators._MEMO.clear()
        with tempfile.TemporaryDirectory() as tmp:
            know = Knowledge(space=data.space, public=data.public, cache_dir=tmp)
            t0 = time.perf_counter()
            GIAS().prior(SmallCNN(1, 8, 10), know)
            times.append(time.perf_counter() - t0)
    _generators._MEMO.clear()
    with tempfile.TemporaryDirectory() as tmp:
        know = Knowledge(space=data.space, history=GradientHistory(*data.public, lr=0.1), cache_dir=tmp)
        t0 = time.perf_counter()
        GIML().prior(SmallCNN(1, 8, 10), know)
        giml = time.perf_counter() - t0
    return {"gan_prior_seconds": [round(t, 1) for t in times], "gan_prior_median": round(statistics.median(times), 1),
            "giml_40_rounds_seconds": round(giml, 1)}


def section_trial(seeds: list[int], cache: str, model: str | None = None) -> dict[str, Any]:
    """Default-study GIAS trials through the real trial runner (prior cached by the first one)."""
    from defenda.plugins import get_plugins
    from defenda.study import default_study_path, parse_study
    from defenda.trial import run_trial

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    raw = tomllib.loads(default_study_path().read_text())
    tasks = raw.pop("tasks", None) or [raw.pop("task")]
    raw["tasks"] = [t for t in tasks if t["name"] == "digits"][:1]  # the default study's digits task
    if model:
        raw["tasks"][0] = {"name": "digits", "model": model}
    raw.pop("task", None)
    raw["attacks"] = [{"name": "gias"}]
    raw["defenses"] = [{"name": "none"}]
    raw["study"]["knowledge"] = ["batch_size", "public_data"]
    raw["study"]["seeds"] = [1000, *seeds]  # the first trial trains the prior; it is not counted

    def run() -> list[dict[str, Any]]:
        study = parse_study(raw, get_plugins().registry)
        return [run_trial({**t, "cache_dir": cache})[0] for t in study.trials()]

    rows = run()
    bad = [r for r in rows if r["status"] != "ok"]
    if bad:
        raise RuntimeError(f"trial failed: {bad[0]['reason']}")
    secs = [r["attack_seconds"] for r in rows[1:]]
    return {"task": raw["tasks"][0], "attack_seconds": [round(s, 1) for s in secs], "attack_seconds_median": round(statistics.median(secs), 1),
            "first_trial_with_prior_training": round(rows[0]["attack_seconds"], 1),
            "psnr": [round(r["psnr"], 2) for r in rows[1:]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--sections", default="prior,trial,b16,prune,giml")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats of the prior training")
    ap.add_argument("--cache", default=None, help="generator cache directory (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sections = args.sections.split(",")
    seeds = list(range(args.seeds))
    data = load_digits_task()
    cache = args.cache or tempfile.mkdtemp(prefix="bench-gias-")
    results: dict[str, Any] = {"seeds": seeds, "torch": torch.__version__}
    if "prior" in sections:
        results["prior"] = section_prior(data, args.repeats, cache)
        print(f"### Timing\n\n{json.dumps(results['prior'])}\n", flush=True)
    if "trial" in sections:
        results["trial"] = section_trial(seeds[:3], cache)
        results["trial_cnn"] = section_trial(seeds[:3], cache, model="cnn")
        print(f"### Default-study GIAS trial (B = 1)\n\n{json.dumps(results['trial'])}\n"
              f"{json.dumps(results['trial_cnn'])}\n", flush=True)
    if "b16" in sections:
        results["b16"] = compare(data, {
            f"geiping ({BUDGET})": Geiping(iterations=BUDGET),
            "gias (400 latent + 600 param)": GIAS(latent_iterations=400, iterations=600),
            f"latent only ({BUDGET})": GIAS(latent_iterations=BUDGET, iterations=0),
        }, seeds, 16, cache)
        print(table("B = 16, no defense", results["b16"]) + "\n", flush=True)
    if "prune" in sections:
        results["prune"] = compare(data, {
            f"geiping ({BUDGET})": Geiping(iterations=BUDGET),
            "gias (400 latent + 600 param)": GIAS(latent_iterations=400, iterations=600),
            f"latent only ({BUDGET})": GIAS(latent_iterations=BUDGET, iterations=0),
        }, seeds, 4, cache, prune=0.9)
        print(table("B = 4, 90% pruning", results["prune"]) + "\n", flush=True)
    if "giml" in sections:
        attacks = {f"giml, {r} rounds" + (" (untrained)" if r == 0 else ""): GIML(meta_rounds=r)
                   for r in (0, 10, 20, 40, 80)}
        attacks["gias, GAN prior (reference)"] = GIAS()
        results["giml"] = compare(data, attacks, seeds, 4, cache, prune=0.9)
        print(table("GIAS with the GIML generator, B = 4, 90% pruning", results["giml"]) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
