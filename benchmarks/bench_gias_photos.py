"""GIAS / GIML vs Geiping on ``photos`` (32×32 RGB crops of ten photographs) or ``faces`` (25×25
grayscale LFW crops, ``--data faces``) at the same iteration budget.

For each victim × batch size × attack × seed, one harness-style trial: ``torch.manual_seed(seed)``
before the fresh victim (``build_model(victim, input_shape, classes)``), the batch drawn with
``Generator(10_000 + seed)`` from the train split, its FedSGD gradient (``compute_update``),
``torch.manual_seed(seed + 1)`` before the attack; labels and batch size known, public split
granted (``public_fraction``, default 0.2: 162 crops). Reconstructions are matched one-to-one
(``defenda.metrics.apply_matching``) and scored in unit space: PSNR (mean of per-image PSNR,
MAX = 1) and SSIM (``skimage.metrics.structural_similarity``, ``data_range=1``,
``channel_axis=0``, Gaussian window, via ``defenda.metrics.ssim``).

Attacks, each with ``--budget`` total optimisation steps (default 400: Geiping's default on faces
and digits; on photos its default is 2,000):

* ``geiping`` — Geiping's defaults with ``iterations = budget``;
* ``gias`` — GIAS's defaults with ``latent_iterations + iterations = budget`` (the split is
  GIAS's default ratio unless ``--latent`` is given);
* ``giml`` — GIAS with a generator meta-learned from ``--giml-rounds`` observed rounds
  (``knowledge.history`` from the public split; gradients only), same split;
* ``mean`` — the prior-only baseline: every image guessed as the public split's mean (no update used).

The prior is trained once per public split (timed separately, the ``prior`` column: GAN
training wall time on ``PRIOR_THREADS`` = 1 thread; cached afterwards, so the s/trial
column is the attack alone). Prints one Markdown table of medians over the seeds.

Usage::

    .venv/bin/python benchmarks/bench_gias_photos.py [--data photos] [--victims convnet] [--batches 4,8] [--seeds 5]
        [--budget 400] [--attacks geiping,gias] [--threads 1] [--public-fraction 0.2] [--cache DIR]
        [--set gias:key=value ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from defenda import Knowledge
from defenda.data import load_faces_task, load_photos_task
from defenda.federation import GradientHistory
from defenda.models import build_model
from defenda.testing.trials import harness_trial
from defenda_attacks.geiping import Geiping
from defenda_attacks.gias import GIAS
from defenda_attacks.giml import GIML


def trial(data: Any, victim: str, attack: Any, seed: int, batch: int, cache: str) -> dict[str, float]:
    """PSNR, SSIM and attack seconds of one harness-style trial."""
    out = harness_trial(data, lambda: build_model(victim, data.input_shape, data.num_classes), attack, seed=seed,
                        batch=batch, knowledge={"public": data.public, "cache_dir": cache,
                                                "history": GradientHistory(*data.public, lr=0.1)})
    return {"psnr": out.psnr, "ssim": out.ssim, "s": out.seconds}


class MeanGuess:
    """The prior-only ``mean`` baseline (:mod:`defenda.metrics.baseline`): every image guessed as the public mean."""

    def __init__(self, data: Any) -> None:
        self.data = data

    def reconstruct(self, update: Any, model: Any, knowledge: Knowledge) -> Any:
        from defenda.metrics import prior_guesses

        return prior_guesses(torch.zeros(knowledge.batch_size, *self.data.public[0].shape[1:]), self.data)["mean"]


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def attacks_for(data: Any, names: list[str], budget: int, latent: int | None, giml_rounds: int,
                overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    gias_defaults = GIAS.Params()
    lat = latent if latent is not None else round(
        budget * gias_defaults.latent_iterations / (gias_defaults.latent_iterations + gias_defaults.iterations))
    split = {"latent_iterations": lat, "iterations": budget - lat}
    out: dict[str, Any] = {}
    for name in names:
        if name == "mean":
            out[name] = MeanGuess(data)
        elif name == "geiping":
            out[name] = Geiping(**{"iterations": budget, **overrides.get(name, {})})
        elif name == "gias":
            out[name] = GIAS(**{**split, **overrides.get(name, {})})
        elif name == "giml":
            out[name] = GIML(**{**split, "meta_rounds": giml_rounds, **overrides.get(name, {})})
        else:
            raise SystemExit(f"unknown attack {name!r}")
    return out


def prior_seconds(data: Any, attack: Any, victim: str) -> float:
    """Wall time of training ``attack``'s prior from scratch (fresh memo, fresh cache)."""
    from defenda_attacks import _generators

    _generators._MEMO.clear()
    with tempfile.TemporaryDirectory() as tmp:
        know = Knowledge(space=data.space, public=data.public, history=GradientHistory(*data.public, lr=0.1),
                         cache_dir=tmp)
        t0 = time.perf_counter()
        attack.prior(build_model(victim, data.input_shape, data.num_classes).eval(), know)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="photos", choices=("photos", "faces"))
    ap.add_argument("--victims", default="convnet")
    ap.add_argument("--batches", default="4,8")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--budget", type=int, default=400, help="total optimisation steps of every attack")
    ap.add_argument("--latent", type=int, default=None, help="GIAS/GIML latent-search steps (rest: parameter search)")
    ap.add_argument("--attacks", default="geiping,gias")
    ap.add_argument("--giml-rounds", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--public-fraction", type=float, default=0.2)
    ap.add_argument("--cache", default=None, help="generator cache directory (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], metavar="ATTACK:KEY=VALUE",
                    help="override an attack parameter (repeatable), e.g. gias:lr=0.003")
    ap.add_argument("--no-prior-timing", action="store_true", help="skip the from-scratch prior timing")
    ap.add_argument("--json", default=None, help="also write the per-seed results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides: dict[str, dict[str, Any]] = {}
    for item in args.set:
        who, _, kv = item.partition(":")
        key, _, val = kv.partition("=")
        overrides.setdefault(who, {})[key] = _value(val)
    loader = load_faces_task if args.data == "faces" else load_photos_task
    data = loader(public_fraction=args.public_fraction)
    cache = args.cache or tempfile.mkdtemp(prefix="bench-gias-photos-")
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    attacks = attacks_for(data, args.attacks.split(","), args.budget, args.latent, args.giml_rounds, overrides)
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}", flush=True)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {args.data}, public split {len(data.public[1])} crops; "
          f"overrides {overrides or 'none'}\n", flush=True)
    priors: dict[str, str] = {}
    for name, attack in attacks.items():
        if name in ("gias", "giml") and not args.no_prior_timing:
            priors[name] = f"{prior_seconds(data, attack, args.victims.split(',')[0]):.0f} s"
            print(f"  prior of {name}: {priors[name]}", file=sys.stderr, flush=True)
    results: list[dict[str, Any]] = []
    lines = ["| attack | victim | B | seeds | median PSNR (dB) | median SSIM | median s/trial | prior training |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for victim in args.victims.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            for name, attack in attacks.items():
                runs = []
                for s in seeds:
                    r = trial(data, victim, attack, s, batch, cache)
                    runs.append(r)
                    print(f"  {name:<8} {victim} B={batch} seed {s}: {r['psnr']:6.2f} dB  SSIM {r['ssim']:.3f}  "
                          f"{r['s']:.1f} s", file=sys.stderr, flush=True)
                med = {k: statistics.median(r[k] for r in runs) for k in ("psnr", "ssim", "s")}
                results.append({"attack": name, "victim": victim, "batch": batch, "seeds": seeds, "runs": runs,
                                "median": med})
                lines.append(f"| {name} | {victim} | {batch} | {len(seeds)} | {med['psnr']:.2f} | {med['ssim']:.3f} "
                             f"| {med['s']:.1f} | {priors.get(name, '—')} |")
    print("\n".join(lines), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": sys.argv, "budget": args.budget, "priors": priors,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
