"""The report of a results directory: CSV/Parquet exports, trade-off curves, reconstruction grids, index.md.

Trade-off figure (one per task and leakage metric): one panel per attack plus
a *worst case* panel (for each defended update, the strongest attack), x =
test accuracy, y = leakage; one curve per defense, one point per strength
(median over seeds, bars spanning min..max), ε written beside DP points, the
undefended model marked with a star.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from defenda.harness.store import Store

# Okabe–Ito: a colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
METRIC_LABELS = {
    "psnr": "leakage: PSNR of reconstruction (dB) ↑ worse privacy",
    "ssim": "leakage: SSIM of reconstruction ↑ worse privacy",
    "lpips": "leakage: LPIPS distance ↓ worse privacy",
    "label_acc": "leakage: label accuracy ↑ worse privacy",
    "mae": "leakage: MAE of features (std units) ↓ worse privacy",
}
#: the utility loss at which defenses are compared in the "privacy at equal utility" table
EQUAL_UTILITY_DROP = 0.02
HIGHER_IS_WORSE = {"psnr": True, "ssim": True, "label_acc": True, "lpips": False, "mae": False, "mse": False}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, *, metric: str = "psnr") -> Path:
    """Write the report of ``results_dir`` into ``out_dir`` (default ``results_dir/report``); return index.md."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with Store(results_dir, write=False) as store:
        df = store.dataframe()
        lines = [f"# defenda report: {', '.join(sorted(df['study'].unique())) or 'empty'}", ""]
        df.drop(columns=["extra"]).to_csv(out / "results.csv", index=False)
        _parquet(df, out / "results.parquet")
        lines += _summary(df)
        ok = df[df["status"] == "ok"]
        for task in sorted(ok["task"].unique()):
            sub = ok[ok["task"] == task]
            m = metric if sub[metric].notna().any() else "mae"
            fig = _tradeoff_figure(sub, task, m, out)
            lines += [f"## Task `{task}`", "", f"![trade-off {task}]({fig.name})", "",
                      "### Privacy at equal utility", "",
                      f"For each defense, the strength whose median test accuracy is closest to "
                      f"{EQUAL_UTILITY_DROP * 100:g} points below the undefended model, and the worst-case "
                      f"leakage there (the strongest attack per update).", "",
                      _equal_utility(sub, m), "", "### All cells", "", _table(sub, m), ""]
            for attack in sorted(sub["attack"].unique()):
                grid = _grid(store, sub[sub["attack"] == attack], task, attack, out)
                if grid is not None:
                    lines += [f"### Reconstructions: `{attack}` on `{task}`", "",
                              "Top row: ground truth; then one row per defense strength with its median "
                              "PSNR; columns are the first images of each seed's batch.", "",
                              f"![grid {attack}]({grid.name})", ""]
    lines += _problems(df)
    index = out / "index.md"
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "index.html").write_text(_html(lines, out), encoding="utf-8")
    return index


def _parquet(df: Any, path: Path) -> None:
    try:
        flat = df.copy()
        for col in ("params", "knowledge", "versions", "extra"):
            flat[col] = flat[col].map(lambda v: None if v is None else __import__("json").dumps(v, default=str))
        flat.to_parquet(path, index=False)
    except ImportError:  # pyarrow missing: the CSV is enough
        pass


def _summary(df: Any) -> list[str]:
    counts = df["status"].value_counts().to_dict()
    return ["Trials: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in ("ok", "skipped", "error")) + ".",
            "Exports: [results.csv](results.csv), [results.parquet](results.parquet).", ""]


def _label(defense: str, strength: float | None) -> str:
    return defense if strength is None or (isinstance(strength, float) and math.isnan(strength)) \
        else f"{defense} {strength:g}"


def _aggregate(sub: Any, metric: str) -> Any:
    """Median, min, max over seeds of utility and leakage per (attack, defense, strength)."""
    g = sub.assign(strength=sub["strength"].fillna(-1.0)).groupby(["attack", "defense", "strength"], dropna=False)
    agg = g.agg(acc=("test_acc", "median"), acc_lo=("test_acc", "min"), acc_hi=("test_acc", "max"),
                leak=(metric, "median"), leak_lo=(metric, "min"), leak_hi=(metric, "max"),
                eps=("epsilon", "median"), n=("seed", "count")).reset_index()
    agg.loc[agg["strength"] == -1.0, "strength"] = np.nan
    return agg


def _worst_case(sub: Any, metric: str) -> Any:
    """For each defense setting and seed, the strongest attack's leakage (over attacks and their batch sizes)."""
    keys = ["defense", "strength", "seed"]
    s = sub.assign(strength=sub["strength"].fillna(-1.0)).dropna(subset=[metric])
    best = s.groupby(keys)[metric].max() if HIGHER_IS_WORSE.get(metric, True) else s.groupby(keys)[metric].min()
    acc = s.groupby(keys)["test_acc"].first()
    eps = s.groupby(keys)["epsilon"].first()
    w = best.to_frame().join(acc).join(eps).reset_index()
    w.loc[w["strength"] == -1.0, "strength"] = np.nan
    return w.assign(attack="worst case")


#: PSNR above this is drawn at it (exact recoveries reach 150-250 dB and would flatten every other curve)
PSNR_CEILING = 80.0


def _annotations(d: Any) -> list[tuple[float, float, str]]:
    """Point labels of one curve: every DP point with its ε, otherwise the weakest and strongest strength."""
    dp = d["eps"].notna().any()
    keep = d if dp or len(d) <= 2 else d.iloc[[0, -1]]
    out = []
    for _, r in keep.iterrows():
        tag = f"{r['strength']:g}" if not np.isnan(r["strength"]) else ""
        if r["eps"] is not None and not (isinstance(r["eps"], float) and np.isnan(r["eps"])):
            tag += f" (ε={r['eps']:.2g})"
        out.append((r["acc"], r["leak"], tag))
    return out


def _tradeoff_figure(sub: Any, task: str, metric: str, out: Path) -> Path:
    plt = _plt()
    attacks = sorted(sub["attack"].unique())
    panels = attacks + (["worst case"] if len(attacks) > 1 else [])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.0 * ncols, 4.0 * nrows + 0.9), squeeze=False)
    defenses = sorted(sub["defense"].unique(), key=lambda d: (d != "none", d))
    ceiling = PSNR_CEILING if metric == "psnr" else None
    handles: dict[str, Any] = {}
    for ax, attack in zip(axes.flat, panels):
        data = _worst_case(sub, metric) if attack == "worst case" else sub[sub["attack"] == attack]
        agg = _aggregate(data, metric)
        clipped = False
        if ceiling is not None:  # for display only: tables and exports keep the measured values
            clipped = bool((agg["leak_hi"] > ceiling).any())
            for col in ("leak", "leak_lo", "leak_hi"):
                agg[col] = agg[col].clip(upper=ceiling)
        for i, defense in enumerate(defenses):
            d = agg[agg["defense"] == defense].sort_values("strength")
            if d.empty or d["leak"].isna().all():
                continue
            # "none" is the first defense and drawn as a black star, so curves start at the palette's
            # first colour; Okabe-Ito's yellow (7th) is only reached with more than six defenses
            k = i - 1 if defenses[0] == "none" else i
            style = {"color": PALETTE[k % len(PALETTE)], "marker": MARKERS[k % len(MARKERS)]}
            if defense == "none":
                handles["no defense"] = ax.plot(d["acc"], d["leak"], linestyle="none", marker="*", markersize=15,
                                                color="black", zorder=5)[0]
                continue
            handles[defense] = ax.errorbar(
                d["acc"], d["leak"], xerr=[d["acc"] - d["acc_lo"], d["acc_hi"] - d["acc"]],
                yerr=[d["leak"] - d["leak_lo"], d["leak_hi"] - d["leak"]], capsize=2, linewidth=1.4,
                markersize=5, **style)
            for x, y, tag in _annotations(d):
                ax.annotate(tag, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points",
                            color=style["color"])
        if clipped:
            ax.axhline(ceiling, color="grey", linestyle=":", linewidth=1)
            ax.annotate(f"≥ {ceiling:g} dB (exact) drawn here", (0.01, ceiling), xycoords=("axes fraction", "data"),
                        xytext=(0, -10), textcoords="offset points", fontsize=7, color="grey")
        ax.set_title(attack, fontsize=11)
        ax.set_xlabel("utility: test accuracy (fraction)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(8, len(handles)), fontsize=9,
               frameon=False)
    fig.suptitle(f"Privacy/utility on {task}: one curve per defense, one point per strength "
                 "(median over seeds, bars min–max; labels: weakest/strongest strength, ε for DP)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path = out / f"tradeoff_{task}_{metric}.png"
    fig.savefig(path, dpi=130)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path


def _table(sub: Any, metric: str) -> str:
    agg = _aggregate(sub, metric)
    rows = ["| attack | defense | strength | test acc | ε | " + metric + " (median) | seeds |",
            "|---|---|---|---|---|---|---|"]
    for _, r in agg.sort_values(["attack", "defense", "strength"]).iterrows():
        eps = "" if r["eps"] is None or (isinstance(r["eps"], float) and np.isnan(r["eps"])) else f"{r['eps']:.3g}"
        strength = "" if np.isnan(r["strength"]) else f"{r['strength']:g}"
        acc = "" if np.isnan(r["acc"]) else f"{r['acc']:.3f}"
        leak = "" if np.isnan(r["leak"]) else f"{r['leak']:.2f}"
        rows.append(f"| {r['attack']} | {r['defense']} | {strength} | {acc} | {eps} | {leak} | {r['n']} |")
    return "\n".join(rows)


def _equal_utility(sub: Any, metric: str) -> str:
    """Leakage of each defense at the strength closest to the target utility loss."""
    worst = _aggregate(_worst_case(sub, metric), metric)
    base = worst[worst["defense"] == "none"]
    if base.empty or base["acc"].isna().all():
        return "(needs a `none` defense row with utility)"
    target = float(base["acc"].iloc[0]) - EQUAL_UTILITY_DROP
    rows = [f"| defense | strength | test acc (target {target:.3f}) | ε | worst-case {metric} |",
            "|---|---|---|---|---|",
            f"| none | | {float(base['acc'].iloc[0]):.3f} | | {float(base['leak'].iloc[0]):.2f} |"]
    for defense, d in worst[worst["defense"] != "none"].groupby("defense"):
        d = d.dropna(subset=["acc"])
        if d.empty:
            continue
        r = d.loc[(d["acc"] - target).abs().idxmin()]
        eps = "" if r["eps"] is None or np.isnan(r["eps"]) else f"{r['eps']:.3g}"
        strength = "" if np.isnan(r["strength"]) else f"{r['strength']:g}"
        rows.append(f"| {defense} | {strength} | {r['acc']:.3f} | {eps} | {r['leak']:.2f} |")
    return "\n".join(rows)


def _html(lines: list[str], out: Path) -> str:
    """A self-contained HTML version of index.md (figures embedded as data URIs)."""
    import base64
    import html
    import re

    body: list[str] = []
    table: list[str] = []

    def flush() -> None:
        if table:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in table
                     if not re.fullmatch(r"[|\-\s]+", row)]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            table.clear()

    for line in "\n".join(lines).splitlines():  # a table arrives as one multi-line entry
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        image = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            body.append(f"<h{level}>{html.escape(line.lstrip('#').strip().replace('`', ''))}</h{level}>")
        elif image and (out / image.group(2)).suffix == ".png" and (out / image.group(2)).exists():
            data = base64.b64encode((out / image.group(2)).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(image.group(1))}" src="data:image/png;base64,{data}">')
        elif line.strip():
            text = re.sub(r"\[([^]]+)\]\(([^)]+)\)", r'<a href="\2">\1</a>', html.escape(line))
            body.append(f"<p>{text.replace('`', '')}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 6px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>defenda report</title><style>{style}</style>" \
           f"</head><body>{''.join(body)}</body></html>\n"


def _grid(store: Store, sub: Any, task: str, attack: str, out: Path, max_images: int = 8) -> Path | None:
    """Ground truth row, then one row per (defense, strength): the first images of each seed's batch.

    Batches are drawn as a prefix of one seeded permutation, so a seed's first image is
    the same whatever the batch size; columns therefore line up across rows.
    """
    seeds = sorted(sub["seed"].unique())
    # the same number of images per seed in every row (the smallest batch of the attack), so that
    # column j shows the same private image in every row (large-batch rows have bigger batches)
    per_seed = max(1, min(max_images // len(seeds), int(sub["batch_size"].min())))
    groups = sub.assign(order=sub["defense"] != "none", s=sub["strength"].fillna(-1.0))
    rows: list[tuple[str, np.ndarray]] = []
    truth: np.ndarray | None = None
    for (_, defense, strength), g in groups.groupby(["order", "defense", "s"], sort=True):
        truths, recons, psnrs = [], [], []
        for _, r in g.sort_values("seed").iterrows():
            arrays = store.load_arrays(r["key"])
            if arrays is None:
                continue
            truths.append(arrays["truth"][:per_seed])
            recons.append(arrays["recon"][:per_seed])
            psnrs.append(r["psnr"])
        if not recons:
            continue
        if truth is None:
            truth = np.concatenate(truths)[:max_images]
            rows.append(("ground truth", truth))
        label = f"{_label(defense, None if strength == -1.0 else strength)}\n{np.nanmedian(psnrs):.1f} dB"
        rows.append((label, np.concatenate(recons)[:max_images]))
    if truth is None:
        return None
    plt = _plt()
    ncol = max(len(imgs) for _, imgs in rows)
    width, height = 0.9 * ncol + 1.6, 0.95 * len(rows) + 0.45
    fig, axes = plt.subplots(len(rows), ncol, figsize=(width, height), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(ncol):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(imgs):
                img = imgs[j]
                img = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
                ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    cols = ", ".join(str(s) for s in seeds) + ("" if per_seed == 1 else f" ({per_seed} images each)")
    fig.suptitle(f"{attack} on {task}: columns: seeds {cols}", fontsize=8, y=1 - 0.1 / height)
    fig.subplots_adjust(left=1.6 / width, right=0.99, top=1 - 0.4 / height, bottom=0.01, wspace=0.05, hspace=0.1)
    path = out / f"grid_{task}_{attack}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _problems(df: Any) -> list[str]:
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return []
    lines = ["## Skipped and failed trials", "", "| attack | defense | task | status | reason | count |",
             "|---|---|---|---|---|---|"]
    grouped = bad.groupby(["attack", "defense", "task", "status", "reason"]).size().reset_index(name="n")
    for _, r in grouped.iterrows():
        reason = str(r["reason"]).replace("|", "/")[:160]
        lines.append(f"| {r['attack']} | {r['defense']} | {r['task']} | {r['status']} | {reason} | {r['n']} |")
    return lines + [""]
