"""Compare the rows of two results directories trial by trial (a refactor must keep the numbers).

    python benchmarks/compare_runs.py runs/before runs/after

Trials are matched by key (a hash of their specification). For each attack it
prints how many trials match exactly in status and every number (metrics,
test accuracy, ε, batch size) and lists the first differences. Exit code 1
when a key is missing on either side or any value differs beyond ``--rtol``.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

COLUMNS = ("status", "batch_size", "psnr", "ssim", "lpips", "label_acc", "mse", "mae", "feature_acc",
           "test_acc", "epsilon")


def rows(directory: Path) -> dict[str, dict[str, object]]:
    db = sqlite3.connect(directory / "results.sqlite")
    db.row_factory = sqlite3.Row
    return {r["key"]: dict(r) for r in db.execute(f"SELECT key, attack, defense, strength, seed, "
                                                  f"{', '.join(COLUMNS)} FROM trials")}


def same(a: object, b: object, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b)) or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default: exact)")
    ap.add_argument("--show", type=int, default=5, help="differences to list per attack")
    args = ap.parse_args(argv)
    old, new = rows(args.before), rows(args.after)
    missing = sorted(set(old) ^ set(new))
    total: dict[str, int] = defaultdict(int)
    diffs: dict[str, list[str]] = defaultdict(list)
    for key in sorted(set(old) & set(new)):
        a, b = old[key], new[key]
        total[str(a["attack"])] += 1
        bad = [c for c in COLUMNS if not same(a[c], b[c], args.rtol)]
        if bad:
            diffs[str(a["attack"])].append(f"{a['defense']}@{a['strength']} seed {a['seed']}: "
                                           + ", ".join(f"{c} {a[c]!r} → {b[c]!r}" for c in bad))
    print(f"{len(set(old) & set(new))} trials in both, {len(missing)} in only one")
    for attack in sorted(total):
        print(f"  {attack:10s} {total[attack] - len(diffs[attack]):4d} / {total[attack]:4d} identical")
        for line in diffs[attack][: args.show]:
            print(f"      {line}")
    return 1 if missing or any(diffs.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
