"""SPEAR and Stein on real photographs: the ``photos`` (32×32 RGB, d = 3072) and ``faces`` (25×25 grey) tasks.

Rows (one per attack × victim × data × B; medians over seeds; a fresh victim and batch per seed,
drawn from the task's train split, FedSGD gradient, labels not given, batch size given):

* ``spear`` on the task's MLP d→2000→C at initialisation, float64 (exactness needs it: in float32
  the gradient itself carries ~1e-7 relative error and recoveries stop near 60 dB) and, with
  ``--float32-rows``, float32 as the harness runs it;
* ``spear`` CNN route on ``ConvNet(head=(256,))`` (float32, the harness's precision): the input
  features of ``classifier.1`` are recovered and certified, then inverted to images
  (``defenda_attacks._feature_inversion``). ``1−feat cos``: one minus the true cosine similarity
  between recovered and true features (worst sample of the batch, median over seeds); the attack's own
  ``info["feature_similarity"]`` (the inversion's fit) is in the ``attack fit`` column;
* ``stein`` (malicious server: ``Flatten → Linear(d, m) → tanh → Linear(m, C)`` drawn by
  ``Stein.prepare_model``), span from the first-layer weight gradient, at several widths m;
  ``tensor-step PSNR`` is the quality before the gradient-matching refinement (``refine_steps=0``).

PSNR and SSIM (``skimage.metrics.structural_similarity``, data_range 1) are computed on unit-space
images after Hungarian matching on MSE; "exact" = every sample of the batch above 100 dB.
Seconds are wall time of ``reconstruct`` on a shared machine (read medians).

    python benchmarks/bench_photos_exact.py                      # the README table (~15 min, 2 cores)
    python benchmarks/bench_photos_exact.py --quick              # 2 seeds, fewer rows (smoke)
    python benchmarks/bench_photos_exact.py --data photos --only spear-mlp --seeds 12
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from defenda import Knowledge, TaskData

EXACT_DB = 100.0


@dataclass
class Trial:
    psnr: list[float]
    ssim: list[float]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return bool(self.psnr) and min(self.psnr) > EXACT_DB


_TASKS: dict[str, TaskData] = {}


def task(name: str) -> TaskData:
    """The real task (cached): ``photos`` or ``faces``."""
    if name not in _TASKS:
        from defenda.data import load_faces_task, load_photos_task

        _TASKS[name] = load_photos_task() if name == "photos" else load_faces_task()
    return _TASKS[name]


def batch(d: TaskData, B: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randperm(len(d.train[0]), generator=torch.Generator().manual_seed(seed))[:B]
    return d.train[0][idx], d.train[1][idx]


def score(d: TaskData, x: torch.Tensor, rec: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-sample PSNR and SSIM in unit space after Hungarian matching on MSE."""
    from skimage.metrics import structural_similarity

    a = d.to_unit(x.double())
    b = d.to_unit(rec.double().reshape(-1, *x.shape[1:]))
    fa, fb = a.flatten(1), b.flatten(1)
    cost = torch.cdist(fa, fb, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / fa.shape[1]
    ri, ci = linear_sum_assignment(cost.numpy())
    psnr = [float(10 * math.log10(1 / max(float(cost[i, j]), 1e-300))) for i, j in zip(ri, ci)]
    ssim = []
    for i, j in zip(ri, ci):
        u, v = a[i].numpy(), b[j].clamp(0, 1).numpy()
        ch = 0 if u.ndim == 3 and u.shape[0] > 1 else None
        if ch is None:
            u, v = u.reshape(u.shape[-2:]), v.reshape(v.shape[-2:])
        ssim.append(float(structural_similarity(u, v, data_range=1.0, channel_axis=ch)))
    psnr += [-math.inf] * (len(x) - len(ri))
    return psnr, ssim


def spear_mlp(data: str, B: int, seed: int, width: int = 2000, dtype: torch.dtype = torch.float64,
              **params: Any) -> Trial:
    from defenda.federation.client import compute_update
    from defenda.models import build_model
    from defenda_attacks.spear import Spear

    d = task(data)
    torch.manual_seed(seed)
    model = build_model("mlp", d.input_shape, d.num_classes, widths=(width,)).to(dtype).eval()
    x, y = batch(d, B, seed)
    x = x.to(dtype)
    upd = compute_update(model, x, y)
    kn = Knowledge(space=d.space, batch_size=B, seed=seed)
    t0 = time.perf_counter()
    rec = Spear(**params).reconstruct(upd, model, kn)
    secs = time.perf_counter() - t0
    psnr, ssim = score(d, x, rec.inputs)
    return Trial(psnr, ssim, secs, {"certified": rec.info["n_exact_estimate"]})


def spear_convnet(data: str, B: int, seed: int, head: int = 256, **params: Any) -> Trial:
    from defenda.federation.client import compute_update
    from defenda.models import build_model
    from defenda_attacks.spear import Spear

    d = task(data)
    torch.manual_seed(seed)
    model = build_model("convnet", d.input_shape, d.num_classes, head=(head,)).eval()
    x, y = batch(d, B, seed)
    upd = compute_update(model, x, y)
    kn = Knowledge(space=d.space, batch_size=B, seed=seed)
    t0 = time.perf_counter()
    rec = Spear(**params).reconstruct(upd, model, kn)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        true_f = model.features(x).flatten(1).double()
    rf = torch.tensor(rec.info["features"], dtype=torch.float64).reshape(len(rec.inputs), -1)
    cos = torch.nn.functional.normalize(true_f, dim=1) @ torch.nn.functional.normalize(rf, dim=1).T
    ri, ci = linear_sum_assignment(-cos.numpy())
    psnr, ssim = score(d, x, rec.inputs)
    fit = rec.info.get("feature_similarity", [float("nan")])
    return Trial(psnr, ssim, secs, {"feat_cos": float(cos[ri, ci].min()), "fit": float(min(fit)),
                                    "certified": rec.info["n_exact_estimate"]})


def stein(data: str, B: int, seed: int, width: int, **params: Any) -> Trial:
    from defenda.federation.client import compute_update
    from defenda_attacks.stein import Stein

    d = task(data)
    torch.manual_seed(seed)
    atk = Stein(width=width, span="gradient", **params)
    model = atk.prepare_model(torch.nn.Linear(1, 1), d)
    x, y = batch(d, B, seed)
    upd = compute_update(model, x, y)
    kn = Knowledge(space=d.space, batch_size=B, seed=seed, public=d.public)
    t0 = time.perf_counter()
    rec = atk.reconstruct(upd, model, kn)
    secs = time.perf_counter() - t0
    psnr, ssim = score(d, x, rec.inputs)
    plain = Stein(width=width, span="gradient", refine_steps=0, **params).reconstruct(upd, model, kn)
    p0, _ = score(d, x, plain.inputs)
    return Trial(psnr, ssim, secs, {"tensor_psnr": statistics.median(p0)})


def _fmt(v: float) -> str:
    return "inf" if math.isinf(v) else f"{v:.1f}"


def row(attack: str, victim: str, data: str, B: int, trials: list[Trial], note: str = "") -> str:
    ps = statistics.median(statistics.median(t.psnr) for t in trials)
    ss = statistics.median(statistics.median(t.ssim) for t in trials)
    ex = sum(t.exact for t in trials)
    secs = statistics.median(t.seconds for t in trials)
    return (f"| {attack} | {victim} | {data} | {B} | {len(trials)} | {_fmt(min(ps, 999.0))} | {ss:.3f} | "
            f"{ex}/{len(trials)} | {secs:.1f} | {note} |")


HEADER = ("| attack | victim | data | B | seeds | median PSNR (dB) | median SSIM | exact | s/trial | notes |\n"
          "|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["photos", "faces"], choices=["photos", "faces"])
    ap.add_argument("--only", nargs="+", default=["spear-mlp", "spear-convnet", "stein"],
                    choices=["spear-mlp", "spear-convnet", "stein"])
    ap.add_argument("--seeds", type=int, default=10, help="seeds of the SPEAR-MLP rows (others: --few-seeds)")
    ap.add_argument("--few-seeds", type=int, default=3)
    ap.add_argument("--widths", type=int, nargs="+", default=[5000, 20000, 50000], help="Stein widths m")
    ap.add_argument("--float32-rows", action="store_true", help="also SPEAR-MLP with a float32 victim")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 seeds, widths 5000 only")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.few_seeds, args.widths = 2, 2, [5000]
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}\n\n{HEADER}", flush=True)
    for data in args.data:
        if "spear-mlp" in args.only:
            ts = [spear_mlp(data, 16, s) for s in range(args.seeds)]
            print(row("spear", "mlp 2000, float64", data, 16, ts,
                      f"certified {statistics.median(t.extra['certified'] for t in ts)}/16 (median)"), flush=True)
            if args.float32_rows:
                ts = [spear_mlp(data, 16, s, dtype=torch.float32) for s in range(args.few_seeds)]
                print(row("spear", "mlp 2000, float32", data, 16, ts), flush=True)
        if "spear-convnet" in args.only:
            for B in (1, 4, 8):
                ts = [spear_convnet(data, B, s) for s in range(args.few_seeds)]
                fc = statistics.median(t.extra["feat_cos"] for t in ts)
                fit = statistics.median(t.extra["fit"] for t in ts)
                print(row("spear (CNN route)", "convnet head 256, float32", data, B, ts,
                          f"1−feat cos {1 - fc:.1e}, attack fit {fit:.4f}"), flush=True)
        if "stein" in args.only:
            for m in args.widths:
                for B in (1, 2, 4):
                    ts = [stein(data, B, s, m) for s in range(args.few_seeds)]
                    tp = statistics.median(t.extra["tensor_psnr"] for t in ts)
                    print(row("stein", f"tanh m={m}", data, B, ts, f"tensor-step PSNR {_fmt(tp)}"), flush=True)


if __name__ == "__main__":
    main()
