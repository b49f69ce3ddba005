"""Geiping (Inverting Gradients) on the ``photos`` task: 32×32 RGB crops, fresh victims, FedSGD.

For each victim (``cnn`` the small CNN, ``convnet`` width 16 GroupNorm, ``resnet18`` GroupNorm at
``--resnet-width``, ``lenet``) × batch size × seed: a fresh model (``torch.manual_seed(seed)``), a batch of training
crops drawn with the same seed, its gradient, and ``defenda.reconstruct("geiping", ...)`` with the
attack's defaults (labels recovered, not granted) unless ``--iterations`` / ``--restarts`` /
``--lr`` / ``--tv`` are given. Reconstructions are matched to the batch one-to-one (Hungarian on
MSE) and scored in unit space: PSNR (MAX = 1) and SSIM (``skimage.metrics.structural_similarity``,
``channel_axis=0``, ``data_range=1``). Prints one Markdown table of medians over the seeds.

Run: ``.venv/bin/python benchmarks/bench_geiping_photos.py [--models cnn,convnet,resnet18,lenet]
[--batches 1,4,8] [--seeds 5] [--threads 2]``
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from skimage.metrics import structural_similarity
from torch.nn import functional as F

import defenda
from defenda.data import load_photos_task
from defenda.models import build_model


def trial(data: Any, arch: str, batch: int, seed: int, resnet_width: int, params: dict[str, Any]) -> dict[str, float]:
    torch.manual_seed(seed)
    width = resnet_width if arch == "resnet18" else None
    model = build_model(arch, (3, 32, 32), data.num_classes, width=width).eval()
    xs, ys = data.train
    idx = torch.randperm(len(ys))[:batch]
    x, y = xs[idx], ys[idx]
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    t = time.perf_counter()
    rec = defenda.reconstruct("geiping", model, [g.detach() for g in grads], mean=data.mean, std=data.std,
                              num_classes=data.num_classes, input_shape=(3, 32, 32), seed=seed, **params)
    seconds = time.perf_counter() - t
    a = data.to_unit(rec.inputs).clamp(0, 1)
    b = data.to_unit(x).clamp(0, 1)
    mse = ((a[:, None] - b[None]) ** 2).flatten(2).mean(2).numpy()
    rows, cols = linear_sum_assignment(mse)
    psnr = [float(10 * np.log10(1 / max(mse[i, j], 1e-10))) for i, j in zip(rows, cols)]
    ssim = [float(structural_similarity(a[i].numpy(), b[j].numpy(), channel_axis=0, data_range=1.0))
            for i, j in zip(rows, cols)]
    labels_ok = sorted(rec.labels.tolist()) == sorted(y.tolist()) if rec.labels is not None else False
    return {"psnr": statistics.mean(psnr), "ssim": statistics.mean(ssim), "s": seconds, "labels": float(labels_ok)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", default="cnn,convnet,resnet18,lenet")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--resnet-width", type=int, default=16, help="resnet18 width (CPU cost; 64 is the original)")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--restarts", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--tv", type=float, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = {k: v for k, v in (("iterations", args.iterations), ("restarts", args.restarts), ("lr", args.lr),
                                ("tv", args.tv)) if v is not None}
    data = load_photos_task()
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}", flush=True)
    print(f"torch threads {args.threads}; geiping params {params or 'defaults'}\n", flush=True)
    lines = ["| victim | batch | median PSNR (dB) | median SSIM | labels right | median s/trial | seeds |",
             "|---|---|---|---|---|---|---|"]
    for arch in args.models.split(","):
        for batch in (int(b) for b in args.batches.split(",")):
            runs = [trial(data, arch, batch, seed, args.resnet_width, params) for seed in range(args.seeds)]
            for seed, r in enumerate(runs):
                print(f"  {arch} B={batch} seed={seed}: psnr {r['psnr']:.2f} ssim {r['ssim']:.3f} "
                      f"labels {'ok' if r['labels'] else 'wrong'} {r['s']:.1f}s", flush=True)
            name = f"resnet18 (GroupNorm, width {args.resnet_width})" if arch == "resnet18" else arch
            lines.append(f"| {name} | {batch} | {statistics.median(r['psnr'] for r in runs):.2f} | "
                         f"{statistics.median(r['ssim'] for r in runs):.3f} | "
                         f"{int(sum(r['labels'] for r in runs))}/{len(runs)} | "
                         f"{statistics.median(r['s'] for r in runs):.1f} | {len(runs)} |")
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
