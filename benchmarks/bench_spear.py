"""Benchmark SPEAR on the embedded digits (MLP 64→1000→10 at initialisation, float64 victim).

Prints, per batch size, the median wall time over repeats, the success rate (every
sample PSNR > 100 dB in [0, 1] pixel units after Hungarian matching) and where the
time goes (SVD, peeling, sampling: solves / filtering / assembly, final assembly).

    python benchmarks/bench_spear.py                       # B = 16, 20; 10 repeats; 1 thread
    python benchmarks/bench_spear.py --batch-sizes 16 20 24 --repeats 20
    python benchmarks/bench_spear.py --no-peel             # the paper's sampling search alone
    python benchmarks/bench_spear.py --data gaussian       # uncorrelated inputs (sampling regime)

Goals on a 2-core laptop CPU: B=16 ≤ 3 s, B=20 ≤ 60 s (median).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from scipy.optimize import linear_sum_assignment


def _data(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if kind == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images.reshape(len(d.images), -1) / 16.0, dtype=torch.float64)
        y = torch.tensor(d.target)
    else:  # uncorrelated pixels in [0, 1]
        g = torch.Generator().manual_seed(0)
        x = (0.5 + 0.2 * torch.randn(2000, 64, generator=g, dtype=torch.float64)).clamp(0, 1)
        y = torch.randint(0, 10, (2000,), generator=g)
    mean, std = x.mean(), x.std()  # one mean and std, as for a single-channel image set
    return (x - mean) / std, y, mean, std


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 20])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data", choices=["digits", "gaussian"], default="digits")
    ap.add_argument("--float32", action="store_true", help="victim in float32 (success: PSNR > 60 dB)")
    ap.add_argument("--no-peel", action="store_true", help="disable peeling: sampling search only")
    ap.add_argument("--time-budget", type=float, default=120.0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)

    from defenda.federation.client import compute_update
    from defenda.models import MLP
    from defenda_attacks._spear_core import SpearParams, spear_recover

    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.float32 else torch.float64
    goal_db = 60.0 if args.float32 else 100.0
    x_all, y_all, mean, std = _data(args.data)
    params = SpearParams(peel=not args.no_peel, time_budget_s=args.time_budget)
    print(f"SPEAR benchmark: data={args.data} width={args.width} dtype={dtype} threads={args.threads} "
          f"peel={not args.no_peel} repeats={args.repeats}")
    for B in args.batch_sizes:
        secs, props, stages, ok = [], [], [], 0
        n_exact, n_peeled = [], []
        for seed in range(args.repeats):
            torch.manual_seed(seed)
            model = MLP(x_all.shape[1], 10, (args.width,)).to(dtype).eval()
            idx = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(50_000 + seed))[:B]
            xb, yb = x_all[idx], y_all[idx]
            upd = compute_update(model, xb.to(dtype), yb)
            g = dict(zip(upd.names, upd.tensors))
            lin = model.net[1]
            t0 = time.perf_counter()
            res = spear_recover(g["net.1.weight"], g["net.1.bias"], lin.weight, lin.bias, batch_size=B,
                                params=params, seed=seed)
            secs.append(time.perf_counter() - t0)
            t = (xb * std + mean).double()
            r = (res.inputs * std + mean).double()
            cost = torch.cdist(t, r, compute_mode="donot_use_mm_for_euclid_dist") ** 2 / t.shape[1]
            ri, ci = linear_sum_assignment(cost.numpy())
            psnr = 10 * torch.log10(1 / cost[ri, ci].clamp_min(1e-300))
            success = len(ri) == B and bool((psnr > goal_db).all())
            ok += success
            props.append(res.proposals)
            stages.append(res.timings)
            n_exact.append(res.n_exact)
            n_peeled.append(res.n_peeled)
            if args.verbose:
                print(f"  B={B} seed={seed} ok={success} t={secs[-1]:.2f}s min PSNR={float(psnr.min()):.1f} "
                      f"exact={res.n_exact} peeled={res.n_peeled} proposals={res.proposals} {res.message}")
        keys = sorted({k for s in stages for k in s})
        breakdown = ", ".join(f"{k} {statistics.median(s.get(k, 0.0) for s in stages):.3f}s" for k in keys)
        print(f"B={B:3d}: median {statistics.median(secs):7.2f}s (min {min(secs):.2f}, max {max(secs):.2f})  "
              f"success {ok}/{args.repeats}  median proposals {int(statistics.median(props))}  "
              f"median peeled {statistics.median(n_peeled)}  median exact {statistics.median(n_exact)}")
        print(f"        median per stage: {breakdown}")


if __name__ == "__main__":
    main()
