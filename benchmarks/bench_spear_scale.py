"""SPEAR at scale: data × layer width × batch size, with the oracle labels of spear-scale.md §5.

Victim: a float64 MLP d→m→10 at initialisation (PyTorch default init), FedSGD gradient, labels
not given to the attack, batch size given. Data:

* ``photos``: 32×32 RGB crops (d = 3072) of the natural photographs bundled with scikit-image
  (astronaut, chelsea, coffee, rocket; nothing downloaded), scaled to [0, 1];
* ``digits28``: sklearn digits, each under a random affine map (±15°, scale 0.9–1.1, ±2 px) to
  28×28 bilinear, clipped to [0, 1] (d = 784; full rank up to B ≈ 700 unlike 8×8 digits);
* ``gaussian``: iid N(0.5, 0.2²) pixels clipped to [0, 1], d = 3072 (the easy control).
* ``digits``: the 8×8 sklearn digits as they are (d = 64, rank ≤ 57: B ≤ 48; the default study's data).

Per cell: exact batches (every sample > 100 dB in [0, 1] units after Hungarian matching),
exact samples, median seconds (wall time; the machine is shared: read medians, not minima),
the attack's own certified counts, and the oracles: rank X (information limit), ``ident`` =
#{i: nullity(L_{Z_i}) = 1} on the true masks, the peel oracle (peeling replayed on the true
masks) and firing-rate quantiles. ``limit`` labels a failing cell: ``information`` when rank X
< B or ident < B, else ``search``.

    python benchmarks/bench_spear_scale.py                               # reduced grid
    python benchmarks/bench_spear_scale.py --data photos digits28 gaussian --widths 1000 2000 4000 \\
        --batch-sizes 16 32 64 128 256 --repeats 3                        # the full grid
    python benchmarks/bench_spear_scale.py --noise 1e-3 --data digits digits28 --batch-sizes 4 8 16 --widths 1000 --geiping
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

# The natural RGB photographs bundled with scikit-image. Left out: grey-scale ones (camera, coins:
# three equal channels), mostly black ones (hubble_deep_field, retina's border: near-duplicate
# dark crops make X ill-conditioned, an information limit, not a search one) and synthetic ones.
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def _photo_images() -> list[np.ndarray]:
    """The bundled scikit-image photographs that load without a download, as H×W×3 in [0, 1]."""
    import skimage.data as sd

    out = []
    for name in PHOTOS:
        try:
            im = np.asarray(getattr(sd, name)(), dtype=np.float64)
        except Exception:  # noqa: BLE001 - needs a download (pooch) or is missing in this version
            continue
        if im.ndim == 2:
            im = np.repeat(im[:, :, None], 3, axis=2)
        im = im[:, :, :3] / (255.0 if im.max() > 1.5 else 1.0)
        if min(im.shape[:2]) >= 64:
            out.append(im)
    return out


def photo_crops(B: int, seed: int) -> torch.Tensor:
    """B random 32×32 RGB crops, flattened channel-first (d = 3072), in [0, 1]."""
    imgs = _photo_images()
    r = np.random.default_rng(seed)
    crops = []
    for _ in range(B):
        im = imgs[int(r.integers(len(imgs)))]
        i, j = int(r.integers(im.shape[0] - 32)), int(r.integers(im.shape[1] - 32))
        crops.append(im[i : i + 32, j : j + 32].transpose(2, 0, 1).reshape(-1))
    return torch.tensor(np.stack(crops))


def digits28(B: int, seed: int) -> torch.Tensor:
    """B sklearn digits under random affine maps, 28×28 bilinear, clipped to [0, 1] (d = 784)."""
    from scipy.ndimage import affine_transform
    from sklearn.datasets import load_digits

    imgs = load_digits().images / 16.0
    r = np.random.default_rng(seed)
    out = []
    for _ in range(B):
        im = imgs[int(r.integers(len(imgs)))]
        a, s = math.radians(r.uniform(-15, 15)), r.uniform(0.9, 1.1)
        A = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]) / (s * 28 / 8)
        c_out = np.array([13.5, 13.5]) + r.uniform(-2, 2, 2)
        off = np.array([3.5, 3.5]) - A @ c_out
        out.append(np.clip(affine_transform(im, A, offset=off, output_shape=(28, 28), order=1), 0, 1).reshape(-1))
    return torch.tensor(np.stack(out))


def gaussian(B: int, seed: int, d: int = 3072) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.5 + 0.2 * torch.randn(B, d, generator=g, dtype=torch.float64)).clamp(0, 1)


def digits8(B: int, seed: int) -> torch.Tensor:
    """B sklearn digits as they are, 8×8 in [0, 1] (d = 64: rank ≤ 57, so B ≤ 48 only)."""
    from sklearn.datasets import load_digits

    imgs = load_digits().images.reshape(-1, 64) / 16.0
    idx = np.random.default_rng(seed).choice(len(imgs), size=B, replace=False)
    return torch.tensor(imgs[idx], dtype=torch.float64)


DATA = {"photos": photo_crops, "digits28": digits28, "digits": digits8, "gaussian": gaussian}
MEAN, STD = 0.45, 0.25  # one normalisation for all sets (a user's standardisation)


def matched_psnr(truth: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """Per-sample PSNR (range 1) after Hungarian matching on MSE; -inf where unmatched."""
    cost = torch.cdist(truth, rec, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / truth.shape[1]
    ri, ci = linear_sum_assignment(cost.numpy())
    out = torch.full((truth.shape[0],), -math.inf, dtype=torch.float64)
    out[ri] = 10 * torch.log10(1 / cost[ri, ci].clamp_min(1e-300))
    return out


def oracles(model: Any, xn: torch.Tensor, dW: torch.Tensor) -> dict[str, float]:
    """Information and search oracles from the ground truth (spear-scale.md §5)."""
    lin = model.net[1]
    B = xn.shape[0]
    z = (xn @ lin.weight.T + lin.bias).detach()  # B × m
    act = (z > 0).T  # m × B
    alive = dW.abs().amax(1) > 0
    U = torch.linalg.svd(dW[alive] / dW.abs().max(), full_matrices=False)[0][:, :B]
    ident = 0
    for i in range(B):
        s = torch.linalg.svdvals(U[~act[alive, i]])
        ident += int(s.numel() >= B and float(s[B - 2]) > 1e-8 * float(s[0]) and float(s[B - 1]) < 1e-8 * float(s[0]))
    found = torch.zeros(B, dtype=torch.bool)
    while True:  # peeling replayed on the true masks
        rest = act[:, ~found]
        single = rest.sum(1) == 1
        new = torch.nonzero(~found).flatten()[rest[single].any(0)] if bool(single.any()) else torch.zeros(0)
        if new.numel() == 0:
            break
        found[new.long()] = True
    rate = act[alive].double().mean(1)
    q = torch.quantile(rate, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"rankX": int(torch.linalg.matrix_rank(xn)), "ident": ident, "peel_oracle": int(found.sum()),
            "fire10": round(q[0], 2), "fire50": round(q[1], 2), "fire90": round(q[2], 2)}


def run_one(data: str, width: int, B: int, seed: int, noise: float, attack: str = "spear") -> dict[str, float]:
    from defenda import InputSpace, Knowledge
    from defenda.federation.client import compute_update
    from defenda.models import MLP

    x = DATA[data](B, seed)
    xn = (x - MEAN) / STD
    torch.manual_seed(seed)
    model = MLP(x.shape[1], 10, (width,)).double().eval()
    y = torch.randint(0, 10, (B,), generator=torch.Generator().manual_seed(seed))
    upd = compute_update(model, xn, y)
    if noise > 0:  # gaussian noise defense: std relative to nothing (absolute, as the issue states it)
        g = torch.Generator().manual_seed(10_000 + seed)
        upd = type(upd)(tensors=[t + noise * torch.randn(t.shape, generator=g, dtype=t.dtype) for t in upd.tensors],
                        names=upd.names, kind=upd.kind, batch_size=upd.batch_size, lr=upd.lr)
    space = InputSpace("image", (x.shape[1],), 10, torch.tensor([MEAN]), torch.tensor([STD]))
    kn = Knowledge(space=space, batch_size=B, seed=seed)
    from defenda_attacks.geiping import Geiping
    from defenda_attacks.spear import Spear

    atk = Spear() if attack == "spear" else Geiping()
    t0 = time.perf_counter()
    rec = atk.reconstruct(upd, model, kn)
    secs = time.perf_counter() - t0
    psnr = matched_psnr(x, rec.inputs.double().reshape(rec.inputs.shape[0], -1) * STD + MEAN)
    out = {"seconds": secs, "exact": int((psnr > 100).sum()), "median_psnr": float(psnr.median()),
           "certified": int(rec.info.get("n_exact_estimate", 0)), "dl_columns": int(rec.info.get("n_dl_columns", 0)),
           "peeled": int(rec.info.get("n_peeled", 0)),
           "head": int(rec.info.get("n_head", 0))}
    if noise == 0 and attack == "spear":
        out.update(oracles(model, xn, dict(zip(upd.names, upd.tensors))["net.1.weight"].double()))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["photos"], choices=sorted(DATA))
    ap.add_argument("--widths", type=int, nargs="+", default=[2000])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--noise", type=float, default=0.0, help="gaussian noise std added to every update tensor")
    ap.add_argument("--geiping", action="store_true", help="also run Geiping et al. on the same cells")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    attacks = ["spear"] + (["geiping"] if args.geiping else [])
    print(f"threads={args.threads} repeats={args.repeats} noise={args.noise}")
    for data in args.data:
        for width in args.widths:
            for B in args.batch_sizes:
                for attack in attacks:
                    rows = [run_one(data, width, B, seed, args.noise, attack) for seed in range(args.repeats)]
                    full = sum(r["exact"] == B for r in rows)
                    med = statistics.median(r["seconds"] for r in rows)
                    orc = {k: [r[k] for r in rows] for k in ("rankX", "ident", "peel_oracle") if k in rows[0]}
                    limit = ""
                    if full < len(rows) and orc:
                        info = any(r["rankX"] < B or r["ident"] < B for r in rows)
                        limit = "information" if info else "search"
                    print(f"{attack:8s} {data:9s} m={width:5d} B={B:4d}: exact batches {full}/{len(rows)}  "
                          f"exact samples {[r['exact'] for r in rows]}  certified {[r['certified'] for r in rows]}  "
                          f"dl cols {[r['dl_columns'] for r in rows]}  peeled {[r['peeled'] for r in rows]}  "
                          f"head {[r['head'] for r in rows]}  "
                          f"median PSNR {statistics.median(r['median_psnr'] for r in rows):.1f}  median {med:.1f}s  "
                          f"{orc} {limit}", flush=True)


if __name__ == "__main__":
    main()
