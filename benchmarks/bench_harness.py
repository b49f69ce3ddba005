"""Harness benchmarks (medians over repeats; the machine is noisy, so read the ratios).

* Geiping's time per iteration through defenda against a bare PyTorch loop of the
  same math (sign-Adam on the global cosine + TV, boxed, step schedule), same run.
* ``--photos``: the same for the photos ConvNet (width 16, GroupNorm) with ``--restarts`` restarts
  run as one stacked optimisation, against a bare ``torch.func`` loop of the same stacked math
  (``vmap(grad(·))`` over the restarts) and against the restarts run one after another.
* 2 local workers against 1 on the same study (speed-up): ``defenda run`` end to end,
  process start, utility training, trials and the store included.
* ``--full``: wall time of the whole default study with its report (``defenda run`` into a temp dir).
* ``--attacks``: the attack benchmarks of the other issues (``bench_spear.py``,
  ``bench_stein.py``, ``bench_gias.py --sections prior,trial``), run one after the other.

Run: ``.venv/bin/python benchmarks/bench_harness.py [--repeats 5] [--photos] [--full] [--attacks]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn import functional as F


def _digit_case(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor], object]:
    from defenda.data import load_digits_task
    from defenda.federation.client import gradient
    from defenda.models import SmallCNN

    data = load_digits_task()
    torch.manual_seed(seed)
    model = SmallCNN(1, 8, 10)
    x, y = data.train[0][seed:seed + 1], data.train[1][seed:seed + 1]
    return model, x, y, gradient(model, x, y), data


def bare_loop(model: torch.nn.Module, y: torch.Tensor, grads: list[torch.Tensor], lo: torch.Tensor,
              hi: torch.Tensor, iterations: int, tv: float = 1e-4) -> torch.Tensor:
    """The same math as Geiping's attack, written as a plain PyTorch loop."""
    params = list(model.parameters())
    x = torch.randn((1, *lo.shape)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    n = iterations
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3 * n // 8, 5 * n // 8, 7 * n // 8], gamma=0.1)
    g_flat = torch.cat([g.flatten() for g in grads])
    for _ in range(n):
        opt.zero_grad()
        pred = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        p_flat = torch.cat([p.flatten() for p in pred])
        loss = 1 - (p_flat @ g_flat) / (p_flat.norm() * g_flat.norm())
        loss = loss + tv * ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())
        x.grad, = torch.autograd.grad(loss, x)
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return x.detach()


def interleaved_medians(runs: list[Callable[[], object]], repeats: int, iterations: int) -> list[float]:
    """Median seconds per iteration of each of ``runs``, timed in turn within every repeat (so all see
    the same machine load), each from ``torch.manual_seed(repeat)``."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        for run, out in zip(runs, times):
            torch.manual_seed(r)
            t = time.perf_counter()
            run()
            out.append((time.perf_counter() - t) / iterations)
    return [statistics.median(t) for t in times]


def geiping_overhead(repeats: int, iterations: int) -> dict[str, float]:
    from defenda import Knowledge, SharedUpdate
    from defenda_attacks.geiping import Geiping

    model, x, y, grads, data = _digit_case()
    model.eval()
    lo, hi = data.box  # type: ignore[attr-defined]
    know = Knowledge(space=data.space, batch_size=1, labels=y)  # type: ignore[attr-defined]
    update = SharedUpdate(grads, [n for n, _ in model.named_parameters()])
    attack = Geiping(iterations=iterations)
    m_ours, m_bare = interleaved_medians(
        [lambda: attack.reconstruct(update, model, know), lambda: bare_loop(model, y, grads, lo, hi, iterations)],
        repeats, iterations)
    return {"geiping_ms_per_iter": 1e3 * m_ours, "bare_ms_per_iter": 1e3 * m_bare, "overhead_ratio": m_ours / m_bare}


def bare_stacked_loop(model: torch.nn.Module, y: torch.Tensor, grads: list[torch.Tensor], lo: torch.Tensor,
                      hi: torch.Tensor, iterations: int, restarts: int, tv: float = 1e-4) -> torch.Tensor:
    """Geiping's stacked restarts written as a bare ``torch.func`` loop: ``vmap(grad(objective))``."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    g_flat = torch.cat([g.flatten() for g in grads])
    g_norm = g_flat.norm()

    def objective(x: torch.Tensor) -> torch.Tensor:
        pred = grad(lambda ps: F.cross_entropy(functional_call(model, dict(zip(names, ps)), (x,)), y))(params)
        p_flat = torch.cat([p.flatten() for p in pred])
        loss = 1 - (p_flat @ g_flat) / (p_flat.norm() * g_norm)
        return loss + tv * ((x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean())

    step = vmap(grad(objective))
    x = torch.randn((restarts, 1, *lo.shape)).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=0.1)
    n = iterations
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3 * n // 8, 5 * n // 8, 7 * n // 8], gamma=0.1)
    for _ in range(n):
        x.grad = step(x.detach()).sign()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return x.detach()


def photos_restarts(repeats: int, iterations: int, restarts: int, threads: int) -> dict[str, float]:
    """Per-iteration cost of Geiping with stacked restarts on the photos ConvNet vs bare loops."""
    from defenda import Knowledge, SharedUpdate
    from defenda.data import load_photos_task
    from defenda.federation.client import gradient
    from defenda.models import build_model
    from defenda_attacks.geiping import Geiping

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    data = load_photos_task()
    torch.manual_seed(0)
    model = build_model("convnet", (3, 32, 32), 10).eval()
    x, y = data.train[0][:1], data.train[1][:1]
    grads = gradient(model, x, y)
    lo, hi = data.box
    know = Knowledge(space=data.space, batch_size=1, labels=y)
    update = SharedUpdate(grads, [n for n, _ in model.named_parameters()])
    attack = Geiping(iterations=iterations, restarts=restarts)

    def sequential() -> None:
        for _ in range(restarts):
            bare_loop(model, y, grads, lo, hi, iterations)

    m_ours, m_bare, m_seq = interleaved_medians(
        [lambda: attack.reconstruct(update, model, know),
         lambda: bare_stacked_loop(model, y, grads, lo, hi, iterations, restarts), sequential], repeats, iterations)
    torch.set_num_threads(previous)
    return {"photos_restarts": restarts, "photos_threads": threads,
            "photos_geiping_ms_per_iter": 1e3 * m_ours, "photos_bare_stacked_ms_per_iter": 1e3 * m_bare,
            "photos_bare_sequential_ms_per_iter": 1e3 * m_seq, "photos_overhead_ratio": m_ours / m_bare,
            "photos_speedup_vs_sequential": m_seq / m_ours}


WORKER_STUDY = """
[study]
name = "bench-workers"
seeds = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
rounds = 100
[task]
name = "digits"
[[attacks]]
name = "geiping"
iterations = 300
[[defenses]]
name = "none"
[[defenses]]
name = "gaussian-noise"
std = [0.01, 0.1]
"""


def _run_cli(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "defenda.cli", *args, "--no-progress"], check=True,
                   capture_output=True)
    return time.perf_counter() - t


def worker_speedup(repeats: int) -> dict[str, float]:
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        study = Path(tmp) / "s.toml"
        study.write_text(WORKER_STUDY)
        for r in range(repeats):
            one.append(_run_cli(["run", str(study), "--out", f"{tmp}/w1-{r}", "--workers", "1"]))
            two.append(_run_cli(["run", str(study), "--out", f"{tmp}/w2-{r}", "--workers", "2"]))
    m1, m2 = statistics.median(one), statistics.median(two)
    return {"workers1_s": m1, "workers2_s": m2, "speedup_2_workers": m1 / m2}


def full_default(workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "defenda.cli", "run", "--out", f"{tmp}/d", "--workers", str(workers),
                        "--report", f"{tmp}/r", "--no-progress"], check=True)
        return {f"default_study_s_workers{workers}": time.perf_counter() - t}


def attack_benchmarks() -> None:
    """The other issues' attack benchmarks, short settings; their own output is printed as it comes."""
    here = Path(__file__).parent
    for script, args in (("bench_spear.py", ["--repeats", "5"]), ("bench_stein.py", ["--repeats", "3"]),
                         ("bench_gias.py", ["--sections", "prior,trial", "--repeats", "1"])):
        print(f"\n## {script} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, str(here / script), *args], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=200)
    ap.add_argument("--photos", action="store_true", help="also the photos ConvNet with stacked restarts")
    ap.add_argument("--restarts", type=int, default=4, help="restarts for --photos")
    ap.add_argument("--photos-iterations", type=int, default=40, help="iterations for --photos")
    ap.add_argument("--photos-threads", type=int, default=2, help="torch threads for --photos")
    ap.add_argument("--full", action="store_true", help="also time the whole default study")
    ap.add_argument("--workers", type=int, default=2, help="workers for --full")
    ap.add_argument("--skip-workers", action="store_true")
    ap.add_argument("--attacks", action="store_true", help="also run the attack benchmarks (spear, stein, gias)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = geiping_overhead(args.repeats, args.iterations)
    print(json.dumps(results), flush=True)
    if args.photos:
        results |= photos_restarts(args.repeats, args.photos_iterations, args.restarts, args.photos_threads)
        print(json.dumps(results), flush=True)
    if not args.skip_workers:
        results |= worker_speedup(max(1, args.repeats // 2))
        print(json.dumps(results), flush=True)
    if args.full:
        results |= full_default(args.workers)
    print(json.dumps(results, indent=2), flush=True)
    if args.attacks:
        attack_benchmarks()


if __name__ == "__main__":
    main()
