"""The report of a results directory: CSV/Parquet exports, trade-off curves, reconstruction grids, index.md.

Trade-off figure (one per task and leakage metric): one panel per attack plus
*worst case* panels (for each defended update, the strongest attack), kept apart
for honest-server and malicious-server attacks (a malicious server chooses the
model's weights: its attacks are a different threat); x = test accuracy (of
the same training run as the attacked updates), y = leakage; one curve per
defense, one point per strength (median over seeds, bars spanning min..max), ε
written beside DP points, the undefended model marked with a star.

Every leakage panel carries a grey *prior only (no update)* band: what an attacker
gets by guessing from the public split alone (its mean; random public samples),
scored on the same true batches; tables put that baseline beside every leakage
value and mark cells that do not beat it. Leakage axes stop at the data's scale
(PSNR at an exact-recovery ceiling, error metrics at a multiple of the prior-only
guess), clipped points drawn on a dotted line. Rows with success rates get a
success-rate table (exact, recognised, identified; pooled k/n with Wilson
intervals), DP rows a figure and table of the identification rate beside the
reconstruction-robustness bound γ and ε, and a rate above its bound is listed as
a violation under *Problems* (:mod:`defenda.harness.report_trust`).

A federated study (rows with an attacked ``round``) also gets a *Federation*
section (its settings, the partition, what the server observes under each
defense), leakage against the attacked round with the global model's test
accuracy beside it, and, when the number of clients in an observed update
varies, leakage against that number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from defenda.harness import report_trust as trust
from defenda.harness.report_style import (
    HIGHER_IS_WORSE,
    MARKERS,
    METRIC_LABELS,
    PALETTE,
    PSNR_CEILING,
    Display,
    clip_for_display,
    display_for,
    draw_band,
    finish_figure,
    has_prior,
    leak_cells,
    legend_bottom,
    mark_cap,
    plt_module,
    strength_param_of,
)
from defenda.harness.store import Store

__all__ = ["HIGHER_IS_WORSE", "MARKERS", "METRIC_LABELS", "PALETTE", "PSNR_CEILING", "write_report"]

#: the utility loss at which defenses are compared in the "privacy at equal utility" table
EQUAL_UTILITY_DROP = 0.02


_plt = plt_module


def write_report(results_dir: str | Path, out_dir: str | Path | None = None, *, metric: str = "psnr") -> Path:
    """Write the report of ``results_dir`` into ``out_dir`` (default ``results_dir/report``); return index.md."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    with Store(results_dir, write=False) as store:
        df = store.dataframe()
        util = store.utility_frame()
        lines = [f"# defenda report: {', '.join(sorted(df['study'].unique())) or 'empty'}", ""]
        df.drop(columns=["extra"]).to_csv(out / "results.csv", index=False)
        _parquet(df, out / "results.parquet")
        lines += _summary(df)
        ok = trust.with_priors(_with_federation(df[df["status"] == "ok"]))
        lines += _federation_section(ok, util)
        kinds = _server_kinds(ok)
        problems: list[str] = []
        for task in sorted(ok["task"].unique()):
            sub = ok[ok["task"] == task]
            m = metric if sub[metric].notna().any() else "mae"
            lines += _task_section(store, sub, task, m, out, util, kinds, problems)
    lines += _problems(df, problems)
    index = out / "index.md"
    index.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out / "index.html").write_text(_html(lines, out), encoding="utf-8")
    return index


def _task_section(store: Store, sub: Any, task: str, m: str, out: Path, util: Any,
                  kinds: dict[str, str], problems: list[str]) -> list[str]:
    """The section of one task: trade-off figure, the federation's figures, tables (leakage, success
    rates, bounds beside ε), reconstruction grids; bound violations are appended to ``problems``."""
    disp = display_for(sub, m)
    fig = _tradeoff_figure(sub, task, disp, out, kinds)
    fed = sub[sub["round"].notna()]
    lines = [f"## Task `{task}`", "", f"![trade-off {task}]({fig.name})", ""]
    lines += _display_notes(disp)
    if not fed.empty:
        lines += ["Utility (x) is the final test accuracy of the global model of the same federated run "
                  "whose updates were attacked (one training run per defense, strength and seed); leakage (y) "
                  "pools the attacked rounds and clients of that run.", ""]
    lines += _federated_figures(fed, task, disp, out, util, kinds)
    split = len(set(kinds.get(a, "honest") for a in sub["attack"].unique())) > 1
    lines += ["### Privacy at equal utility", "",
              f"Rule: for each defense, among the strengths whose median test accuracy is at most "
              f"{EQUAL_UTILITY_DROP * 100:g} points below the undefended model's, the most private one — the "
              f"lowest worst-case leakage (the strongest attack per update"
              + ("; honest-server and malicious-server attacks apart, the worse of the two decides" if split
                 else "") + "), ties toward the strongest setting; where no strength keeps that utility, "
              "the most accurate one, marked.", "",
              _equal_utility(sub, m, kinds), "", "### All cells", "", _table(sub, m), ""]
    lines += trust.success_section(sub, task, out)
    bounds, found = trust.bounds_section(sub, task, out)
    lines += bounds
    problems += found
    for attack in sorted(sub["attack"].unique()):
        grid = _grid(store, sub[sub["attack"] == attack], task, attack, out)
        if grid is not None:
            lines += [f"### Reconstructions: `{attack}` on `{task}`", "",
                      "Top row: ground truth; then one row per defense strength with its median "
                      "PSNR; columns are the first images of each "
                      + ("attacked update's batch (seed, round, client)." if not fed.empty else "seed's batch."), "",
                      f"![grid {attack}]({grid.name})", ""]
    return lines


def _display_notes(disp: Display) -> list[str]:
    """What the reader must know to read the task's leakage axes: the prior-only band, the cap."""
    notes = []
    if disp.band is not None:
        notes.append(f"Grey band, *prior only (no update)*: the {disp.metric} of the two guesses an attacker makes "
                     f"without any update, scored on the same true batches — every sample guessed as the public "
                     f"split's mean, and random public samples (medians over the task's trials: "
                     f"{disp.band[0]:.3g} and {disp.band[1]:.3g}). A point inside or beyond the band leaks "
                     f"nothing an attacker could not guess; in the tables such cells are marked `≤ prior`, and "
                     f"*prior only* is the better of the two guesses on that cell's batches.")
    if disp.cap is not None and disp.metric != "psnr":
        notes.append(f"Axes: {disp.metric} values above {disp.cap:.3g} (" + (
            "three times the worse prior-only guess" if disp.band is not None else
            "three times the median of the task's values; these rows have no baseline") +
            ") are drawn on the dotted line at that value (a diverged reconstruction leaks nothing more); the "
            "tables and exports keep the measured values.")
    elif disp.cap is not None:
        notes.append(f"Axes: PSNR above {disp.cap:g} dB (exact recovery) is drawn on the dotted line at that value; "
                     "the tables and exports keep the measured values.")
    return [" ".join(notes), ""] if notes else []


def _federated_figures(fed: Any, task: str, disp: Display, out: Path, util: Any,
                       kinds: dict[str, str]) -> list[str]:
    """Leakage against the attacked round and against the aggregation size, where the rows vary them."""
    lines: list[str] = []
    if fed.empty:
        return lines
    fig = _round_figure(fed, task, disp, out, util, kinds)
    if fig is not None:
        lines += ["### Leakage against the attacked round: does training close the gap?", "",
                  "One panel per attack, one line per defense and strength (by default `none` and each "
                  "defense's weakest and strongest strength); median over seeds and attacked clients, bars "
                  "min–max. Thin grey line, right axis: test accuracy of the undefended run's global model "
                  "as the clients of that round received it.", "", f"![leakage by round {task}]({fig.name})", ""]
    fig = _aggregation_figure(fed, task, disp, out, kinds)
    if fig is not None:
        lines += ["### Leakage against the number of aggregated clients", "",
                  "Defenses under which the server observes only an aggregate (secure aggregation): x = "
                  "clients in the observed update, one line per attack, median over seeds and rounds (bars "
                  "min–max); dashed: the same attack on one client's update with no defense.", "",
                  f"![leakage by aggregation size {task}]({fig.name})", ""]
    return lines


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


#: the columns a federated row fills (a store written before them is read without them)
FEDERATION_COLUMNS = ("round", "client", "num_samples", "aggregation_size", "epsilon_round")


def _with_federation(df: Any) -> Any:
    """``df`` with the federation columns (empty where missing), ``K`` (clients per round) and
    ``fed_id`` (F1, F2, ...: one per distinct federation, "" for the single-client protocol)."""
    import json

    df = df.copy()
    for col in FEDERATION_COLUMNS:
        if col not in df:
            df[col] = np.nan
        df[col] = df[col].astype(float)
    feds = df["params"].map(lambda p: (p or {}).get("federation") if isinstance(p, dict) else None)
    sig = feds.map(lambda f: json.dumps(f, sort_keys=True, default=str) if f else "")
    ids = {k: f"F{i + 1}" for i, k in enumerate(sorted(k for k in sig.unique() if k))}
    df["fed_id"] = sig.map(lambda k: ids.get(k, ""))
    df["K"] = feds.map(lambda f: float(f.get("clients_per_round", np.nan)) if f else np.nan)
    return df


def _federation_brief(rows: Any) -> str:
    """What tells one federation of a study from another, in a few words (panel titles)."""
    f = rows["params"].iloc[0].get("federation") or {}
    if f.get("update") == "delta":
        update = f"FedAvg E={f.get('local_epochs')} b={f.get('local_batch_size')}"
    else:
        update = f"FedSGD b={f.get('local_batch_size')}"
    return f"{update}, K={f.get('clients_per_round')} of N={f.get('clients')}"


def _server_kinds(df: Any) -> dict[str, str]:
    """``"honest"`` or ``"malicious"`` per attack: the attack's declared requirement (registry), or, for
    an attack that is not installed, the ``server`` column of its rows."""
    try:
        from defenda.plugins import get_plugins

        registry: Any = get_plugins().registry
    except Exception:  # the report needs no plugin; fall back on the rows
        registry = None
    kinds = {}
    for attack, rows in df.groupby("attack"):
        kind = None
        if registry is not None:
            try:
                kind = registry.get("attack", attack).cls.requires.server
            except Exception:
                kind = None
        if kind not in ("honest", "malicious"):
            kind = "malicious" if (rows["server"] == "malicious").any() else "honest"
        kinds[str(attack)] = str(kind)
    return kinds


def _label(defense: str, strength: float | None) -> str:
    return defense if strength is None or (isinstance(strength, float) and math.isnan(strength)) \
        else f"{defense} {strength:g}"


def _aggregate(sub: Any, metric: str) -> Any:
    """Median, min, max over seeds of utility and leakage per (attack, defense, strength), and the
    median prior-only value (``prior``: NaN for rows without a baseline)."""
    prior = f"prior:{metric}"
    sub = sub.assign(**{prior: sub[prior] if prior in sub else np.nan})
    g = sub.assign(strength=sub["strength"].fillna(-1.0)).groupby(["attack", "defense", "strength"], dropna=False)
    agg = g.agg(acc=("test_acc", "median"), acc_lo=("test_acc", "min"), acc_hi=("test_acc", "max"),
                leak=(metric, "median"), leak_lo=(metric, "min"), leak_hi=(metric, "max"),
                eps=("epsilon", "median"), n=("seed", "count"), prior=(prior, "median")).reset_index()
    agg.loc[agg["strength"] == -1.0, "strength"] = np.nan
    return agg


def _worst_case(sub: Any, metric: str, label: str = "worst case") -> Any:
    """For each defended update (defense setting, seed and, in a federation, attacked round and client),
    the strongest attack's leakage (over attacks and their batch sizes), and the best prior-only guess
    over the same attacks' batches (the baseline the worst case must beat)."""
    keys = ["defense", "strength", "seed"]
    prior = f"prior:{metric}"
    s = sub.assign(strength=sub["strength"].fillna(-1.0)).dropna(subset=[metric])
    s = s.assign(**{prior: s[prior] if prior in s else np.nan})
    for col in ("round", "client"):
        if col in s:
            s = s.assign(**{col: s[col].fillna(-2.0)})
            keys.append(col)
    g = s.groupby(keys)
    worse = HIGHER_IS_WORSE.get(metric, True)
    best = g[metric].max() if worse else g[metric].min()
    base = g[prior].max() if worse else g[prior].min()
    w = best.to_frame().join(base).join(g["test_acc"].first()).join(g["epsilon"].first()).reset_index()
    w.loc[w["strength"] == -1.0, "strength"] = np.nan
    return w.assign(attack=label)


def _worst_case_panels(sub: Any, metric: str, kinds: dict[str, str]) -> list[tuple[str, Any]]:
    """The worst-case panels, kept apart for honest-server and malicious-server attacks: one per kind with
    more than one attack (the worst case of a single attack is that attack's own panel)."""
    attacks = sorted(sub["attack"].unique())
    panels = []
    for kind in ("honest", "malicious"):
        names = [a for a in attacks if kinds.get(a, "honest") == kind]
        if len(names) > 1:
            title = f"worst case ({kind} server)\nstrongest of {', '.join(names)}"
            panels.append((title, _worst_case(sub[sub["attack"].isin(names)], metric, title)))
    return panels


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


def _tradeoff_figure(sub: Any, task: str, disp: Display, out: Path, kinds: dict[str, str] | None = None) -> Path:
    plt = _plt()
    metric = disp.metric
    kinds = kinds if kinds is not None else _server_kinds(sub)
    attacks = sorted(sub["attack"].unique())
    panels = [(a + (" (malicious server)" if kinds.get(a) == "malicious" else ""), sub[sub["attack"] == a])
              for a in attacks] + _worst_case_panels(sub, metric, kinds)
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, 5.0 * ncols), 4.0 * nrows + 0.9), squeeze=False)
    defenses = sorted(sub["defense"].unique(), key=lambda d: (d != "none", d))
    federated = "round" in sub and bool(sub["round"].notna().all())
    xlabel = ("utility: test accuracy of the same federated run (fraction)" if federated
              else "utility: test accuracy (fraction)")
    handles: dict[str, Any] = {}
    for ax, (title, data) in zip(axes.flat, panels):
        _tradeoff_panel(ax, _aggregate(data, metric), defenses, disp, handles)
        ax.set_title(title, fontsize=11 if "\n" not in title else 10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.grid(alpha=0.3)
    title = (f"Privacy/utility on {task}: one curve per defense, one point per strength"
             + ("\n" if ncols < 3 else " ") + "(median over seeds, bars min–max; labels: weakest/strongest "
             "strength, ε for DP)")
    return finish_figure(plt, fig, axes, len(panels), handles, title=title, ncol=min(8, len(handles)),
                         rect=(0, 0.06, 1, 0.97 if ncols > 2 else 0.95), path=out / f"tradeoff_{task}_{metric}.png",
                         svg=True)


def _tradeoff_panel(ax: Any, agg: Any, defenses: list[str], disp: Display, handles: dict[str, Any]) -> None:
    """One trade-off panel: the prior-only band, a curve per defense (a star for ``none``)."""
    draw_band(ax, disp, handles)
    agg, ceiling = clip_for_display(agg, disp)
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
    mark_cap(ax, disp, ceiling)


#: at most this many curves per panel before the leakage-by-round figure keeps only each defense's extremes
MAX_CURVES = 6
LINESTYLES = ["-", "--", ":", "-."]


def _curves(rows: Any, limit: int = MAX_CURVES) -> list[tuple[str, float, str]]:
    """The (defense, strength, federation) curves to draw: all if at most ``limit``, else ``none`` and each
    defense's weakest and strongest strength (strength NaN is -1.0 here)."""
    combos = rows.assign(s=rows["strength"].fillna(-1.0))[["defense", "s", "fed_id"]].drop_duplicates()
    every = sorted(((str(d), float(s), str(f)) for d, s, f in combos.itertuples(index=False)),
                   key=lambda c: (c[0] != "none", c[0], c[2], c[1]))
    if len(every) <= limit:
        return every
    keep: list[tuple[str, float, str]] = []
    for defense, fid in dict.fromkeys((d, f) for d, _, f in every):
        ss = [s for d, s, f in every if (d, f) == (defense, fid)]
        keep += [(defense, v, fid) for v in dict.fromkeys([ss[0], ss[-1]])]
    return keep


def _curve_label(defense: str, strength: float, fid: str, many_feds: bool) -> str:
    label = defense if strength == -1.0 else f"{defense}@{strength:g}"
    return label + (f" [{fid}]" if many_feds else "")


def _curve_styles(curves: list[tuple[str, float, str]]) -> dict[tuple[str, float, str], dict[str, Any]]:
    """Colour and marker per defense (black for ``none``), line style per strength within the defense."""
    defenses = list(dict.fromkeys(d for d, _, _ in curves if d != "none"))
    rank: dict[tuple[str, str], int] = {}
    styles = {}
    for c in curves:
        r = rank[(c[0], c[2])] = rank.get((c[0], c[2]), -1) + 1
        k = defenses.index(c[0]) if c[0] != "none" else -1
        styles[c] = {"color": "black" if k < 0 else PALETTE[k % len(PALETTE)],
                     "marker": "*" if k < 0 else MARKERS[k % len(MARKERS)],
                     "markersize": 9 if k < 0 else 5, "linestyle": LINESTYLES[r % len(LINESTYLES)]}
    return styles


def _accuracy_by_round(fed: Any, util: Any) -> Any:
    """Median test accuracy per evaluated round of the undefended training runs behind ``fed``, at x = round + 1
    (the model the clients of round r + 1 receive), or None."""
    import pandas as pd

    if util is None or util.empty or "extra" not in util:
        return None
    runs = util[util["key"].isin(set(fed.loc[fed["defense"] == "none", "utility_key"]))]
    points = [(int(r) + 1, float(a)) for e in runs["extra"] if isinstance(e, dict)
              for r, a in (e.get("accuracy") or []) if a is not None]
    if not points:
        return None
    return pd.DataFrame(points, columns=["x", "acc"]).groupby("x")["acc"].median()


def _leak_by(rows: Any, x: str, disp: Display) -> Any:
    """Median, min and max leakage per value of column ``x`` (clipped for display at the cap)."""
    g = rows.assign(v=rows[disp.metric].astype(float)).dropna(subset=["v", x]).groupby(x)["v"]
    agg = g.agg(leak="median", leak_lo="min", leak_hi="max").reset_index().sort_values(x)
    return clip_for_display(agg, disp)


def _round_figure(fed: Any, task: str, disp: Display, out: Path, util: Any, kinds: dict[str, str]) -> Path | None:
    """Leakage against the attacked round: a panel per attack (a row of them per federation), a line per
    defense and strength, the undefended global model's test accuracy on a twin axis (thin grey)."""
    if fed["round"].nunique() < 2:
        return None
    plt = _plt()
    attacks = sorted(fed["attack"].unique())
    feds = sorted(fed["fed_id"].unique())
    # only the (attack, federation) pairs with rows: attacks with their own batch sizes run in their own federations
    panels = [(a, f) for f in feds for a in attacks if ((fed["attack"] == a) & (fed["fed_id"] == f)).any()]
    chosen = {f: _curves(fed[fed["fed_id"] == f]) for f in feds}
    styles = _curve_styles([c for f in feds for c in chosen[f]])
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(8.0, 5.4 * ncols), 3.9 * nrows + 1.0), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, (attack, fid) in zip(axes.flat, panels):
        rows = fed[(fed["attack"] == attack) & (fed["fed_id"] == fid)]
        _round_panel(ax, rows, chosen[fid], styles, disp, handles)
        acc = _accuracy_by_round(fed[fed["fed_id"] == fid], util)
        if acc is not None:
            twin = ax.twinx()
            line = twin.plot(acc.index, acc.values, color="grey", linewidth=0.9, alpha=0.8, marker=".", markersize=4)
            handles["test accuracy, no defense (right axis)"] = line[0]
            twin.set_ylim(0, 1)
            twin.set_ylabel("test accuracy of the global model\nthe round's clients receive (no defense)",
                            fontsize=7, color="grey")
            twin.tick_params(axis="y", labelsize=7, colors="grey")
        title = attack + (" (malicious server)" if kinds.get(attack) == "malicious" else "")
        if len(feds) > 1:
            title += f"\nfederation {fid}: {_federation_brief(rows)}" if len(rows) else f"\n{fid}"
        ax.set_title(title, fontsize=11 if len(feds) == 1 else 10)
    title = (f"Leakage against the attacked round on {task}: does training close the gap? "
             "(median over seeds and attacked clients, bars min–max)")
    return finish_figure(plt, fig, axes, len(panels), handles, title=title, ncol=min(4, len(handles)),
                         rect=(0, legend_bottom(len(handles), 4, 3.9 * nrows + 1.0), 1, 0.96),
                         path=out / f"rounds_{task}_{disp.metric}.png")


def _round_panel(ax: Any, rows: Any, curves: list[tuple[str, float, str]], styles: dict[Any, dict[str, Any]],
                 disp: Display, handles: dict[str, Any]) -> None:
    """One attack's leakage by round: the prior-only band, a line per (defense, strength) curve."""
    from matplotlib.ticker import MaxNLocator

    draw_band(ax, disp, handles)
    ceiling = None
    for c in curves:
        d = rows[(rows["defense"] == c[0]) & (rows["strength"].fillna(-1.0) == c[1]) & (rows["fed_id"] == c[2])]
        agg, clip = _leak_by(d, "round", disp)
        if agg.empty:
            continue
        ceiling = ceiling or clip
        handles[_curve_label(*c, False)] = ax.errorbar(
            agg["round"], agg["leak"], yerr=[agg["leak"] - agg["leak_lo"], agg["leak_hi"] - agg["leak"]],
            capsize=2, linewidth=1.4, **styles[c])
    mark_cap(ax, disp, ceiling)
    ax.set_xlabel("attacked round")
    ax.set_ylabel(METRIC_LABELS.get(disp.metric, disp.metric), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _one_protocol(fed: Any) -> Any:
    """The rows of the federations that differ only in K (the largest such group): a FedSGD sweep
    over K must not be pooled with FedAvg runs that happen to share a K."""
    import json

    def rest(p: Any) -> str:
        f = (p or {}).get("federation") or {} if isinstance(p, dict) else {}
        return json.dumps({k: v for k, v in f.items() if k != "clients_per_round"}, sort_keys=True, default=str)

    key = fed["params"].map(rest)
    best = max(key.unique(), key=lambda k: (fed.loc[key == k, "K"].nunique(), (key == k).sum()))
    return fed[key == best]


def _aggregation_figure(fed: Any, task: str, disp: Display, out: Path, kinds: dict[str, str]) -> Path | None:
    """Leakage against the number of clients in the observed update, for the defenses under which the
    server sees only an aggregate: a panel per defense and strength, a line per attack."""
    if fed["aggregation_size"].nunique() < 2 and fed["K"].nunique() < 2:
        return None
    fed = _one_protocol(fed)
    hides = {d for d, g in fed.groupby("defense") if d == "secure-aggregation" or (g["aggregation_size"] > 1).any()}
    # the federations differ in K here; the panels are per defense and strength, K is on the x axis
    rows = fed[fed["defense"].isin(hides)]
    rows = rows.assign(n=rows["aggregation_size"].fillna(rows["K"]), fed_id="")
    if rows.empty or rows["n"].nunique() < 2:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    panels = _curves(rows)
    attacks = sorted(fed["attack"].unique())
    metric = disp.metric
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.5, 5.0 * ncols), 3.9 * nrows + 1.3), squeeze=False)
    handles: dict[str, Any] = {}
    dashed = None
    for ax, c in zip(axes.flat, panels):
        d = rows[(rows["defense"] == c[0]) & (rows["strength"].fillna(-1.0) == c[1]) & (rows["fed_id"] == c[2])]
        ceiling = None
        draw_band(ax, disp, handles)
        for i, attack in enumerate(attacks):
            style = {"color": PALETTE[i % len(PALETTE)], "marker": MARKERS[i % len(MARKERS)]}
            agg, clip = _leak_by(d[d["attack"] == attack], "n", disp)
            base, _ = _leak_by(fed[(fed["attack"] == attack) & (fed["defense"] == "none")].assign(one=1), "one",
                               disp)
            if not agg.empty:
                ceiling = ceiling or clip
                handles[attack + (" (malicious server)" if kinds.get(attack) == "malicious" else "")] = ax.errorbar(agg["n"], agg["leak"], capsize=2, linewidth=1.4, markersize=5,
                                              yerr=[agg["leak"] - agg["leak_lo"], agg["leak_hi"] - agg["leak"]],
                                              **style)
            if not base.empty:
                ax.axhline(float(base["leak"].iloc[0]), color=style["color"], linestyle="--", linewidth=1, alpha=0.7)
                dashed = Line2D([], [], color="grey", linestyle="--", linewidth=1)
        mark_cap(ax, disp, ceiling)
        ax.set_title(_curve_label(*c, False), fontsize=11)
        ax.set_xlabel("clients aggregated in the observed update")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric), fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if dashed is not None:
        handles["dashed: same attack, no defense (one client's update)"] = dashed
    legend_cols = min(len(handles), 2 if ncols == 1 else 4)  # one panel is too narrow for four entries a row
    title = f"Leakage against the number of aggregated clients on {task}\n(median over seeds and rounds, bars min–max)"
    return finish_figure(plt, fig, axes, len(panels), handles, title=title, ncol=legend_cols,
                         rect=(0, legend_bottom(len(handles), legend_cols, 3.9 * nrows + 1.3), 1, 0.94),
                         path=out / f"aggregation_{task}_{metric}.png")


def _table(sub: Any, metric: str) -> str:
    """Every (attack, defense, strength): utility, ε, median leakage beside the prior-only value and,
    where the rows record it, the median fraction of reconstructed values clipped into the domain."""
    clipped = sub["extra"].map(lambda e: (e or {}).get("clipped_fraction") if isinstance(e, dict) else None)
    sub = sub.assign(clipped=clipped.map(lambda v: float(v) if isinstance(v, (int, float)) else np.nan))
    agg = _aggregate(sub, metric)
    has_clip = bool(sub["clipped"].notna().any())
    if has_clip:
        frac = sub.assign(strength=sub["strength"].fillna(-1.0)).groupby(["attack", "defense", "strength"])
        agg = agg.assign(clip=agg.apply(lambda r: frac["clipped"].median().get(
            (r["attack"], r["defense"], -1.0 if np.isnan(r["strength"]) else r["strength"]), np.nan), axis=1))
    # in a federation one seed is attacked at several rounds and clients: the count is of attacked updates
    count = "attacked updates" if "round" in sub and sub["round"].notna().any() else "seeds"
    prior = has_prior(sub, metric)
    rows = ["| attack | defense | strength | test acc | ε | " + metric + " (median) | " + ("prior only | " if prior else "")
            + f"{count} |" + (" values clipped to the domain (median) |" if has_clip else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if prior else "") + ("---|" if has_clip else "")]
    for _, r in agg.sort_values(["attack", "defense", "strength"]).iterrows():
        eps = "" if r["eps"] is None or (isinstance(r["eps"], float) and np.isnan(r["eps"])) else f"{r['eps']:.3g}"
        strength = "" if np.isnan(r["strength"]) else f"{r['strength']:g}"
        acc = "" if np.isnan(r["acc"]) else f"{r['acc']:.3f}"
        clip = (" " + ("" if np.isnan(r["clip"]) else f"{r['clip']:.1%}") + " |") if has_clip else ""
        rows.append(f"| {r['attack']} | {r['defense']} | {strength} | {acc} | {eps} | "
                    f"{leak_cells(r['leak'], r['prior'], metric, prior)} | {r['n']} |{clip}")
    return "\n".join(rows)


def _equal_utility(sub: Any, metric: str, kinds: dict[str, str] | None = None) -> str:
    """Leakage of each defense at the strength closest to the target utility loss (the worst case over
    honest-server and over malicious-server attacks apart, where the rows have both)."""
    kinds = kinds if kinds is not None else _server_kinds(sub)
    by_kind = {k: sub[sub["attack"].map(lambda a: kinds.get(a, "honest") == k)] for k in ("honest", "malicious")}
    parts = [(f", {k} server", _aggregate(_worst_case(d, metric), metric)) for k, d in by_kind.items() if not d.empty]
    if len(parts) == 1:
        parts = [("", parts[0][1])]
    elif not parts:
        parts = [("", _aggregate(_worst_case(sub, metric), metric))]
    worst = parts[0][1]
    prior = has_prior(sub, metric)
    base = worst[worst["defense"] == "none"]
    if base.empty or base["acc"].isna().all():
        return "(needs a `none` defense row with utility)"

    def leaks(defense: str, strength: float) -> str:
        out = []
        for _, frame in parts:
            hit = frame[(frame["defense"] == defense) & ((frame["strength"] == strength)
                                                         | (frame["strength"].isna() & np.isnan(strength)))]
            out.append((" | " if prior else "") if hit.empty
                       else leak_cells(hit["leak"].iloc[0], hit["prior"].iloc[0], metric, prior))
        return " | ".join(out)

    target = float(base["acc"].iloc[0]) - EQUAL_UTILITY_DROP
    rows = [f"| defense | strength | test acc (target {target:.3f}) | ε | "
            + " | ".join(f"worst-case {metric}{tag}" + (f" | prior only{tag}" if prior else "") for tag, _ in parts)
            + " |", "|---|---|---|---|" + ("---|---|" if prior else "---|") * len(parts),
            f"| none | | {float(base['acc'].iloc[0]):.3f} | | {leaks('none', float(base['strength'].iloc[0]))} |"]
    for defense, d in worst[worst["defense"] != "none"].groupby("defense"):
        d = d.dropna(subset=["acc"])
        if d.empty:
            continue
        r, within = _most_private(d, parts, str(defense), target, metric)
        eps = "" if r["eps"] is None or np.isnan(r["eps"]) else f"{r['eps']:.3g}"
        strength = "" if np.isnan(r["strength"]) else f"{r['strength']:g}"
        acc = f"{r['acc']:.3f}" + ("" if within else " (none within target: the most accurate)")
        rows.append(f"| {defense} | {strength} | {acc} | {eps} | {leaks(str(defense), r['strength'])} |")
    return "\n".join(rows)


def _most_private(d: Any, parts: list[tuple[str, Any]], defense: str, target: float,
                  metric: str) -> tuple[Any, bool]:
    """The equal-utility rule: among the strengths whose median test accuracy reaches ``target``, the
    one whose worst case (the worse of the honest- and malicious-server worst cases) leaks least; ties
    go to the strongest setting. When no strength reaches the target, the most accurate one."""
    ok = d[d["acc"] >= target - 1e-12]
    if ok.empty:
        return d.loc[d["acc"].idxmax()], False
    sign = 1.0 if HIGHER_IS_WORSE.get(metric, True) else -1.0
    up = _strength_direction(defense) == "up"

    def badness(strength: float) -> float:
        vals = []
        for _, frame in parts:
            hit = frame[(frame["defense"] == defense) & ((frame["strength"] == strength)
                                                         | (frame["strength"].isna() & np.isnan(strength)))]
            if not hit.empty and not np.isnan(hit["leak"].iloc[0]):
                vals.append(sign * float(hit["leak"].iloc[0]))
        return max(vals) if vals else math.inf

    def key(i: Any) -> tuple[float, float]:
        st = float(ok.loc[i, "strength"])
        return badness(st), -(st if up else -st) if not np.isnan(st) else 0.0

    return ok.loc[min(ok.index, key=key)], True


def _strength_direction(defense: str) -> str:
    """``"up"`` or ``"down"``: which way a defense's strength parameter makes it stronger (the last
    component with a strength for a composed defense; "up" when the plugin is not installed)."""
    sp = strength_param_of(defense)
    return "up" if sp is None else str(sp.strength)


def _partition_text(f: dict[str, Any]) -> str:
    kind = str(f.get("partition", ""))
    if kind == "dirichlet":
        return f"dirichlet (α={f.get('alpha'):g})" if isinstance(f.get("alpha"), (int, float)) else kind
    if kind == "shards":
        return f"shards ({f.get('shards_per_client')} per client)"
    return kind


def _client_sizes(util: Any, fed: dict[str, Any]) -> str:
    """min / median / max samples per client over the training runs of federation ``fed``."""
    if util is None or util.empty or "extra" not in util:
        return ""
    sizes = [n for e in util["extra"] if isinstance(e, dict) and e.get("federation") == fed
             for n in (e.get("client_sizes") or [])]
    return f"{min(sizes)} / {np.median(sizes):g} / {max(sizes)}" if sizes else ""


def _federation_section(ok: Any, util: Any) -> list[str]:
    """Federated studies: the federations (settings, partition) and what the server observes per defense."""
    fed = ok[ok["round"].notna()]
    if fed.empty:
        return []
    lines = ["## Federation", "",
             "The attacked updates come from a simulated federation: the training set is split over the clients "
             "(the partition), each round the server samples some of them, they train locally on their own data "
             "and the server aggregates their updates; attacks target updates of chosen rounds. Utility is the "
             "final test accuracy of the global model of that same run.", "",
             "| federation | task | clients | partition | samples per client (min / median / max) | "
             "clients per round | rounds | client update | server lr | attacked rounds | targets per round | δ | "
             "trials |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fid, rows in fed.groupby("fed_id"):
        f = rows["params"].iloc[0]["federation"]
        update = (f"{f.get('update')}: {f.get('local_epochs')} local epoch(s), batch {f.get('local_batch_size')}, "
                  f"lr {f.get('lr')}")
        attacked = ", ".join(str(r) for r in f.get("attack_rounds") or []) or \
            ", ".join(f"{r:g}" for r in sorted(rows["round"].unique()))
        lines.append(f"| {fid} | {', '.join(sorted(rows['task'].unique()))} | {f.get('clients')} | "
                     f"{_partition_text(f)} | {_client_sizes(util, f)} | {f.get('clients_per_round')} "
                     f"({f.get('sampling')}) | {f.get('rounds')} | {update} | {f.get('server_lr')} | {attacked} | "
                     f"{f.get('targets_per_round')} | {f.get('delta')} | {len(rows)} |")
    lines += ["", "### What the server observes", "",
              "| defense | strengths | DP level | δ | accountant | ε of the attacked client at its round (median) | "
              "what the server observes |", "|---|---|---|---|---|---|---|"]
    for defense, rows in fed.groupby("defense"):
        lines += _observation_rows(str(defense), rows)
    return lines + [""]


_DP_LEVELS = {"sample": "sample-level (each example)", "client": "client-level (each client's whole update)"}


def _observed(g: Any) -> str:
    """In plain words, what the server observes of the attacked updates ``g`` (rows of one defense)."""
    sizes = g["aggregation_size"].dropna()
    noise = g["noise"].iloc[0]
    if not ((sizes > 1).any() or (g["client"] == -1).any()):
        if noise == "after":
            return ("central DP-FedAvg: the server sees each clipped update before the noise — no protection "
                    "against the server itself")
        what = "each sampled client's own update"
    else:
        n = "several" if sizes.empty else f"{sizes.max():g}" if sizes.min() == sizes.max() \
            else f"{sizes.min():g}–{sizes.max():g}"
        if noise == "after":
            return (f"central DP-FedAvg: the server sees the aggregate of {n} clipped updates before the noise — "
                    "no protection against the server itself (it never sees one client's update alone)")
        what = f"only the aggregate of {n} clients' updates, never one client's alone"
    return what + (", with the noise already in it (added on the client)" if noise == "before" else "")


def _observation_rows(defense: str, rows: Any) -> list[str]:
    """One table row per distinct (DP level, noise position) of a defense's federated rows."""
    extra = rows["extra"].map(lambda e: e if isinstance(e, dict) else {})
    rows = rows.assign(dp_level=extra.map(lambda e: e.get("dp_level") or ""),
                       noise=extra.map(lambda e: e.get("noise_position") or ""),
                       dp_delta=extra.map(lambda e: e.get("delta")), accountant=extra.map(lambda e: e.get("accountant")))
    out = []
    for (level, _), g in rows.groupby(["dp_level", "noise"], sort=True):
        strengths = ", ".join(f"{v:g}" for v in sorted(g["strength"].dropna().unique()))
        eps = g["epsilon_round"].dropna()
        delta = next((f"{v:g}" for v in g["dp_delta"] if isinstance(v, (int, float)) and v == v), "")
        accountant = next((str(v) for v in g["accountant"] if v), "")
        out.append(f"| {defense} | {strengths} | {_DP_LEVELS.get(level, level or '—')} | {delta} | {accountant} | "
                   f"{f'{eps.median():.3g}' if len(eps) else ''} | {_observed(g)} |")
    return out


def _html(lines: list[str], out: Path) -> str:
    """A self-contained HTML version of index.md: Python-Markdown (tables extension) renders it, and
    the figures are embedded as data URIs so the file can be mailed or archived alone."""
    import base64
    import html
    import re

    import markdown

    body = markdown.markdown("\n".join(lines), extensions=["tables"], output_format="html")

    def embed(match: re.Match[str]) -> str:
        path = out / html.unescape(match.group(2))
        if path.suffix != ".png" or not path.is_file():
            return match.group(0)
        return f'{match.group(1)}"data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}"'

    body = re.sub(r'(<img[^>]*?src=)"([^"]+)"', embed, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 6px;font-size:13px}img{max-width:100%}")
    return f"<!doctype html><html><head><meta charset='utf-8'><title>defenda report</title><style>{style}</style>" \
           f"</head><body>{body}</body></html>\n"


def _grid(store: Store, sub: Any, task: str, attack: str, out: Path, max_images: int = 8) -> Path | None:
    """Ground truth row, then one row per (defense, strength): the first images of each seed's batch.

    Batches are drawn as a prefix of one seeded permutation, so a seed's first image is
    the same whatever the batch size; columns therefore line up across rows.
    """
    seeds = sorted(sub["seed"].unique())
    # in a federation a seed's run is attacked at several rounds and clients: a unit is (seed, round, client)
    federated = "round" in sub and bool(sub["round"].notna().any())
    order = ["seed", "round", "client"] if federated else ["seed"]
    units = sub[order].drop_duplicates().sort_values(order)
    # the same number of images per unit in every row (the smallest batch of the attack), so that
    # column j shows the same private image in every row (large-batch rows have bigger batches)
    per_seed = max(1, min(max_images // len(units), int(sub["batch_size"].min())))
    groups = sub.assign(order=sub["defense"] != "none", s=sub["strength"].fillna(-1.0))
    rows: list[tuple[str, np.ndarray]] = []
    truth: np.ndarray | None = None
    for (_, defense, strength), g in groups.groupby(["order", "defense", "s"], sort=True):
        truths, recons, psnrs = [], [], []
        for _, r in g.sort_values(order).iterrows():
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
    cols = ", ".join(str(s) for s in seeds) if not federated else \
        "(seed, round, client) " + ", ".join(f"({u.seed:g}, {u.round:g}, {u.client:g})" for u in units.itertuples())
    cols += "" if per_seed == 1 else f" ({per_seed} images each)"
    fig.suptitle(f"{attack} on {task}: columns: {'' if federated else 'seeds '}{cols}", fontsize=8,
                 y=1 - 0.1 / height)
    fig.subplots_adjust(left=1.6 / width, right=0.99, top=1 - 0.4 / height, bottom=0.01, wspace=0.05, hspace=0.1)
    path = out / f"grid_{task}_{attack}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _problems(df: Any, found: list[str] | None = None) -> list[str]:
    """The Problems section (measured rates above their bound: each one is a bug somewhere), then the
    skipped and failed trials."""
    lines = ["## Problems", "", *(f"- {p}" for p in found), ""] if found else []
    bad = df[df["status"] != "ok"]
    if bad.empty:
        return lines
    lines += ["## Skipped and failed trials", "", "| attack | defense | task | status | reason | count |",
             "|---|---|---|---|---|---|"]
    grouped = bad.groupby(["attack", "defense", "task", "status", "reason"]).size().reset_index(name="n")
    for _, r in grouped.iterrows():
        reason = str(r["reason"]).replace("|", "/")[:160]
        lines.append(f"| {r['attack']} | {r['defense']} | {r['task']} | {r['status']} | {reason} | {r['n']} |")
    return lines + [""]
