"""The report's numbers a reviewer can check: the prior-only baseline, success rates with intervals,
and reconstruction bounds beside ε (issue 14).

* **Prior-only baseline.** Every ok row carries ``extra["baseline"]``: its metrics scored on the same
  true batch for two guesses an attacker makes without any update (the public split's mean; random
  public samples). :func:`with_priors` makes columns of them; a leakage value that does not beat the
  better of the two is leakage the attacker gets for free.
* **Success rates.** ``exact_rate``, ``recognised_rate``, ``ident_acc`` are fractions of a row's B
  samples, so a cell's count is k = Σ round(rate·B) over its rows and n = Σ B; intervals are 95% Wilson.
  The samples of one batch (and of one run's rounds) are correlated, so the intervals are optimistic.
* **Bounds.** DP rows carry ``rero_bound`` γ: no attacker identifies the target among n candidates
  with probability above γ (Hayes, Mahloujifar & Balle, NeurIPS 2023). A measured rate whose
  one-sided Clopper–Pearson lower bound exceeds γ cannot be sampling noise: a bug somewhere.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from defenda.harness.report_style import (
    HIGHER_IS_WORSE,
    MARKERS,
    NOT_BEATEN,
    PALETTE,
    finish_figure,
    legend_bottom,
    plt_module,
    strength_param_of,
)

#: the success-rate columns of a trial row and their names in the report
RATES = {"exact_rate": "exact recovery", "recognised_rate": "recognised", "ident_acc": "identified"}
BASELINES = ("mean", "sample")
#: confidence level of every interval in the report
LEVEL = 0.95
#: the family-wise level at which a measured rate above its bound is called a violation (Bonferroni
#: over the settings checked: a report scans many, and a false alarm would send someone bug-hunting)
VIOLATION_ALPHA = 0.05
#: columns a store written before issue 14 lacks (read as empty)
TRUST_COLUMNS = ("exact_rate", "recognised_rate", "ident_acc", "epsilon_release", "rero_bound", "epsilon_round")


def _extra(df: Any) -> Any:
    return df["extra"].map(lambda e: e if isinstance(e, dict) else {})


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def with_priors(df: Any) -> Any:
    """``df`` with the trust columns (NaN where missing) and, per metric found in the rows' baselines,
    ``prior_mean:<m>``, ``prior_sample:<m>`` and ``prior:<m>`` (the better guess for the attacker:
    the larger PSNR, the smaller MAE)."""
    df = df.copy()
    for col in TRUST_COLUMNS:
        if col not in df:
            df[col] = np.nan
        df[col] = df[col].astype(float)
    base = _extra(df).map(lambda e: e.get("baseline") if isinstance(e.get("baseline"), dict) else {})
    metrics = sorted({str(m) for b in base for g in b.values() if isinstance(g, dict) for m in g})
    for m in metrics:
        for name in BASELINES:
            df[f"prior_{name}:{m}"] = base.map(lambda b, n=name, m=m: _num((b.get(n) or {}).get(m)))
        pair = df[[f"prior_mean:{m}", f"prior_sample:{m}"]].to_numpy(dtype=float)
        best = np.fmax if HIGHER_IS_WORSE.get(m, True) else np.fmin
        df[f"prior:{m}"] = best(pair[:, 0], pair[:, 1])
    return df


def wilson(k: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson interval of k successes in n (scipy's; (nan, nan) for n = 0)."""
    if n <= 0:
        return math.nan, math.nan
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)


def cp_lower(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper–Pearson lower confidence bound at level 1 − alpha."""
    if n <= 0 or k <= 0:
        return 0.0
    from scipy.stats import binomtest

    return float(binomtest(int(k), int(n), alternative="greater").proportion_ci(1 - alpha, method="exact").low)


def pooled(rows: Any, col: str) -> tuple[int, int]:
    """(k, n): successes and samples of ``col`` over ``rows`` (k = round(rate·B) per row, B its samples)."""
    if col not in rows:
        return 0, 0
    r = rows[rows[col].notna() & rows["batch_size"].notna()]
    if r.empty:
        return 0, 0
    b = _samples(r)
    return int(np.round(r[col].astype(float) * b).sum()), int(b.sum())


def _samples(rows: Any) -> Any:
    """Samples behind each row: the realised ``num_samples`` in a federation (a Poisson-sampled batch
    varies around the nominal ``batch_size`` the row is grouped by), else ``batch_size``."""
    b = rows["batch_size"].astype(float)
    if "num_samples" in rows:
        b = rows["num_samples"].astype(float).where(rows["num_samples"].notna(), b)
    return b


def _kappa(rows: Any) -> float:
    ks = _extra(rows).map(lambda e: _num((e.get("identification") or {}).get("kappa"))).dropna()
    return float(ks.median()) if len(ks) else math.nan


def _rate_text(k: int, n: int) -> str:
    if n == 0:
        return "n/a"
    lo, hi = wilson(k, n)
    return f"{k}/{n} = {k / n:.2f} ({lo:.2f}–{hi:.2f})"


def _strength_text(s: float) -> str:
    return "" if s is None or np.isnan(s) else f"{s:g}"


def _cells(sub: Any) -> tuple[Any, list[str]]:
    """``sub`` with strength NaN as -1 (groupable) and the cell keys: attack, defense, strength, and the
    batch size where an attack has several."""
    s = sub.assign(strength=sub["strength"].fillna(-1.0))
    keys = ["attack", "defense", "strength"]
    if (s.groupby("attack")["batch_size"].nunique() > 1).any():
        keys.append("batch_size")
    return s, keys


def has_rates(sub: Any) -> bool:
    return any(c in sub and sub[c].notna().any() for c in RATES)


def success_section(sub: Any, task: str, out: Path) -> list[str]:
    """The success-rate table of a task (and ``success_<task>.csv``: pooled and per-seed counts)."""
    if not has_rates(sub):
        return []
    s, keys = _cells(sub)
    batch = "batch_size" in keys
    head = "| attack | defense | strength | " + ("B | " if batch else "") + "κ | " + \
        " | ".join(f"{name} k/n = rate (95% CI)" for name in RATES.values()) + " | identified, prior only | trials |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    records = []
    for key, g in s.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        counts = {c: pooled(g, c) for c in RATES}
        prior = max((pooled(g, f"prior_{b}:ident_acc") for b in BASELINES),
                    key=lambda kn: kn[0] / kn[1] if kn[1] else -1.0)
        ident = counts["ident_acc"]
        texts = [_rate_text(*counts[c]) for c in RATES]
        if ident[1] and prior[1] and ident[0] / ident[1] <= prior[0] / prior[1]:
            texts[-1] += f" {NOT_BEATEN}"
        kappa = _kappa(g)
        strength = _strength_text(math.nan if cell["strength"] == -1.0 else cell["strength"])
        lines.append(f"| {cell['attack']} | {cell['defense']} | {strength} | "
                     + (f"{int(cell['batch_size'])} | " if batch else "")
                     + ("" if np.isnan(kappa) else f"{kappa:.3g}") + " | " + " | ".join(texts) + " | "
                     + (f"{prior[0] / prior[1]:.2f}" if prior[1] else "") + f" | {len(g)} |")
        records += _success_records(g, cell, counts)
    _write_csv(records, out / f"success_{task}.csv")
    return ["### Success rates", "",
            "Per attack, defense and strength"
            + (" and batch size" if batch else "") + ": the fraction of samples **exactly recovered** (per-sample "
            "MSE ≤ 1e-10, in unit space for images, i.e. PSNR ≥ 100 dB, in standardised model space for tabular "
            "data), **recognised** (per-sample PSNR ≥ 20 dB for images, MAE ≤ 0.25 SD for tabular features) "
            "and **identified** (the reconstruction strictly nearer to its true sample than to every one of n − 1 "
            "distractors drawn from the attacker's public split; chance level κ = 1/n). Unmatched samples count "
            "as failures. k/n pools all samples of all seeds' (and rounds') trials; intervals are 95% Wilson. "
            "The samples of one batch and the rounds of one run are correlated, so the intervals are "
            "optimistic; per-seed rates are in "
            f"[success_{task}.csv](success_{task}.csv). *identified, prior only*: the better of the two "
            f"prior-only guesses; `{NOT_BEATEN}`: the attack identifies no more often than that guess.", "",
            "The recognition threshold is a convention, not a sourced value: the literature has no agreed "
            "one (Sun et al., NeurIPS 2023, found that PSNR, SSIM and LPIPS correlate only weakly with whether "
            "humans recognise a reconstruction); identification at a stated κ is the measure the bounds below "
            "speak about.", "", *lines, ""]


def _success_records(g: Any, cell: dict[str, Any], counts: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """CSV records of one cell: pooled counts, then one per seed."""
    strength = math.nan if cell["strength"] == -1.0 else cell["strength"]
    base = {"attack": cell["attack"], "defense": cell["defense"], "strength": strength,
            "batch_size": cell.get("batch_size", ""), "kappa": _kappa(g)}
    out = []
    for col in RATES:
        for seed, rows in [("all", g), *sorted(g.groupby("seed"))]:
            k, n = counts[col] if seed == "all" else pooled(rows, col)
            if n == 0:
                continue
            lo, hi = wilson(k, n)
            out.append({**base, "seed": seed, "rate": col, "k": k, "n": n, "value": k / n,
                        "wilson_low": lo, "wilson_high": hi})
    return out


def _write_csv(records: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    pd.DataFrame(records).to_csv(path, index=False)


# --- reconstruction bounds beside ε -------------------------------------------------------------------

def _rero(rows: Any) -> Any:
    return _extra(rows).map(lambda e: e.get("rero") if isinstance(e.get("rero"), dict) else None)


def dp_rows(sub: Any) -> Any:
    """The rows a bound speaks about: those with a bound or a statement why none covers them."""
    return sub[sub["rero_bound"].notna() | _rero(sub).notna()]


def _bound_summary(g: Any) -> dict[str, Any]:
    """γ of a cell: the sample-weighted mean of its rows' bounds (the pooled success probability is at
    most that), their range, the method, and why not covered where no row is."""
    rero = _rero(g)
    covered = g[g["rero_bound"].notna()]
    reasons = sorted({str(r.get("reason")) for r in rero if r and not r.get("covered", True) and r.get("reason")})
    methods = sorted({str(r.get("method")) for r in rero if r and r.get("method")})
    gdp = [_num(r.get("gdp_estimate")) for r in rero if r]
    gdp = [v for v in gdp if not np.isnan(v)]
    anyrec = [v for v in (_num(r.get("bound_any_record")) for r in rero if r) if not np.isnan(v)]
    if covered.empty:
        return {"gamma": math.nan, "lo": math.nan, "hi": math.nan, "methods": methods, "reasons": reasons,
                "gdp": float(np.median(gdp)) if gdp else math.nan, "any_record": math.nan}
    w = _samples(covered).fillna(1.0)
    gamma = float((covered["rero_bound"] * w).sum() / w.sum())
    return {"gamma": gamma, "lo": float(covered["rero_bound"].min()), "hi": float(covered["rero_bound"].max()),
            "methods": methods, "reasons": reasons, "gdp": float(np.median(gdp)) if gdp else math.nan,
            "any_record": float(np.median(anyrec)) if anyrec else math.nan}


def bound_cells(sub: Any) -> list[dict[str, Any]]:
    """One record per (attack, defense, strength[, batch size]) of the DP rows: ε's, κ, the pooled
    identification count, the bound."""
    rows = dp_rows(sub)
    if rows.empty:
        return []
    s, keys = _cells(rows)
    cells = []
    for key, g in s.groupby(keys, sort=True):
        cell = dict(zip(keys, key))
        cell["strength"] = math.nan if cell["strength"] == -1.0 else cell["strength"]
        k, n = pooled(g, "ident_acc")
        cells.append({**cell, **_bound_summary(g), "k": k, "n": n, "kappa": _kappa(g),
                      "eps": float(g["epsilon"].median()) if g["epsilon"].notna().any() else math.nan,
                      "eps_release": float(g["epsilon_release"].median()) if g["epsilon_release"].notna().any()
                      else math.nan,
                      "eps_round": float(g["epsilon_round"].median()) if g["epsilon_round"].notna().any()
                      else math.nan})
    return cells


def violations(cells: list[dict[str, Any]], task: str) -> list[str]:
    """Settings whose measured identification rate is above the bound beyond sampling noise: the
    one-sided Clopper–Pearson lower bound, Bonferroni-corrected over the settings checked, exceeds γ."""
    checked = [c for c in cells if c["n"] and not np.isnan(c["gamma"])]
    alpha = VIOLATION_ALPHA / max(1, len(checked))
    out = []
    for c in checked:
        low = cp_lower(c["k"], c["n"], alpha)
        if low > c["gamma"] + 1e-12:
            out.append(f"VIOLATION — a bug somewhere: `{c['attack']}` on `{task}` under {c['defense']} "
                       f"{_strength_text(c['strength'])}: identified {c['k']}/{c['n']} (one-sided "
                       f"{(1 - alpha) * 100:.3g}% Clopper–Pearson lower bound {low:.3f}) above the bound "
                       f"γ = {c['gamma']:.3f} at κ = {c['kappa']:.3g}. No attacker can beat γ: the accountant, "
                       f"the simulator, the bound or the identification metric is wrong.")
    return out


def _fmt(v: float, spec: str = ".3g") -> str:
    return "" if v is None or np.isnan(v) else format(v, spec)


def bounds_table(cells: list[dict[str, Any]]) -> list[str]:
    batch = any("batch_size" in c for c in cells)
    head = ("| attack | defense | strength | " + ("B | " if batch else "") + "ε (end of run) | ε of the attacked "
            "release | ε up to the attacked round | κ | identified k/n = rate (95% CI) | bound γ | "
            "γ for any record of the client | Gaussian-DP estimate (not a bound) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        if np.isnan(c["gamma"]):
            bound = "not covered: " + ("; ".join(c["reasons"]) or "no bound for this setting")
        else:
            spread = "" if c["hi"] - c["lo"] < 5e-4 else f", {c['lo']:.3f}–{c['hi']:.3f} over rounds"
            bound = f"{c['gamma']:.3f} ({', '.join(c['methods']) or 'bound'}{spread})"
        lines.append(f"| {c['attack']} | {c['defense']} | {_strength_text(c['strength'])} | "
                     + (f"{int(c['batch_size'])} | " if batch else "")
                     + f"{_fmt(c['eps'])} | {_fmt(c['eps_release'])} | {_fmt(c['eps_round'])} | "
                     f"{_fmt(c['kappa'])} | {_rate_text(c['k'], c['n'])} | {bound.replace('|', '/')} | "
                     f"{_fmt(c.get('any_record', math.nan), '.3f')} | {_fmt(c['gdp'], '.3f')} |")
    return lines


def bounds_section(sub: Any, task: str, out: Path) -> tuple[list[str], list[str]]:
    """The bounds figure and table of a task, and the violations found (for the Problems section)."""
    cells = bound_cells(sub)
    if not cells:
        return [], []
    fig = bounds_figure(cells, task, out)
    lines = ["### Reconstruction bounds beside ε", "",
             "For every DP setting: the measured identification rate (among n candidates, chance κ = 1/n) and "
             "the upper bound γ on the success of *any* attacker with that prior under the setting's DP "
             "mechanism (reconstruction robustness; Hayes, Mahloujifar & Balle, NeurIPS 2023, computed from a "
             "privacy-loss-distribution accountant). The attacks are scored on the samples the client drew, "
             "so γ bounds a record *known to be in* the attacked batch: that release counts without its "
             "subsampling (q = 1), earlier rounds with theirs. The protection of any record of the client, chosen "
             "before sampling, is the smaller amplified bound in its own column; it does not describe the "
             "measured experiment. A row with several attacked rounds shows the "
             "sample-weighted mean of its rounds' bounds (the pooled rate can exceed none of them on average). "
             "Where the bound does not cover the adversary (a curious server under central DP sees the "
             "updates before the noise), the row says so instead of a number. The Gaussian-DP value "
             "Φ(Φ⁻¹(κ) + μ) is an estimate, not a bound. A measured rate whose one-sided Clopper–Pearson lower "
             f"bound (level {(1 - VIOLATION_ALPHA) * 100:g}%, Bonferroni over the settings) exceeds γ is "
             "flagged under Problems.", ""]
    if fig is not None:
        lines += [f"![bounds {task}]({fig.name})", ""]
    return lines + bounds_table(cells) + [""], violations(cells, task)


def bounds_figure(cells: list[dict[str, Any]], task: str, out: Path) -> Path | None:
    """A panel per DP defense: x = strength, the measured identification rate per attack (point, Wilson
    bars), the bound γ (black), κ (dashed)."""
    defenses = sorted({c["defense"] for c in cells})
    attacks = sorted({c["attack"] for c in cells})
    plt = plt_module()
    ncols = min(3, len(defenses))
    nrows = math.ceil(len(defenses) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.5, 5.2 * ncols), 4.0 * nrows + 0.9), squeeze=False)
    handles: dict[str, Any] = {}
    for ax, defense in zip(axes.flat, defenses):
        mine = [c for c in cells if c["defense"] == defense]
        _bounds_panel(ax, mine, attacks, handles)
        reasons = sorted({r for c in mine if np.isnan(c["gamma"]) for r in c["reasons"]})
        # in the title, not over the points: why this panel has no bound (or only some settings have one)
        note = "" if not reasons else "\n" + textwrap.fill("no bound: " + "; ".join(reasons), 60)
        ax.set_title(defense + note, fontsize=11 if not note else 9)
    legend_cols = min(len(handles), 2 if ncols == 1 else 4)  # one panel is too narrow for four entries a row
    title = (f"Identification on {task} beside the reconstruction-robustness bound\n(pooled over seeds and "
             "rounds, bars: 95% Wilson; labels: ε at the end of the run)")
    return finish_figure(plt, fig, axes, len(defenses), handles, title=title, ncol=max(1, legend_cols),
                         rect=(0, legend_bottom(len(handles), legend_cols, 4.0 * nrows + 0.9), 1, 0.93),
                         path=out / f"bounds_{task}.png")


def _strength_name(defense: str) -> str:
    """The name of a defense's strength parameter (the last component with one), "" when unknown."""
    sp = strength_param_of(defense)
    return "" if sp is None else str(sp.name)


def _bounds_panel(ax: Any, cells: list[dict[str, Any]], attacks: list[str], handles: dict[str, Any]) -> None:
    """One DP defense: per attack the measured rate (jittered in x so attacks do not hide each other)
    with its own bound beside it, the bound's curve over strengths, κ, and why a setting is not covered."""
    xs = sorted({c["strength"] for c in cells if not np.isnan(c["strength"])})
    log = bool(xs) and xs[0] > 0 and xs[-1] / xs[0] > 20
    span = (xs[-1] - xs[0]) if len(xs) > 1 else max(abs(xs[0]) if xs else 1.0, 1e-3)
    step = 1.06 if log else (0.015 if len(xs) > 1 else 0.04) * span
    if len(xs) == 1:  # one strength: centre it (matplotlib would zoom onto the jitter)
        ax.set_xlim(xs[0] - 0.5 * span, xs[0] + 0.5 * span)
    for i, attack in enumerate(attacks):
        mine = sorted((c for c in cells if c["attack"] == attack and c["n"]), key=lambda c: c["strength"])
        if not mine:
            continue
        off = i - (len(attacks) - 1) / 2
        x = [c["strength"] * step ** off if log else c["strength"] + step * off for c in mine]
        p = np.array([c["k"] / c["n"] for c in mine])
        ci = np.array([wilson(c["k"], c["n"]) for c in mine])
        handles[f"identified: {attack}"] = ax.errorbar(
            x, p, yerr=[p - ci[:, 0], ci[:, 1] - p], linestyle="none", capsize=3, markersize=6,
            color=PALETTE[i % len(PALETTE)], marker=MARKERS[i % len(MARKERS)])
        # each attack's own bound beside its point: attacks with other rounds or batches may have another γ
        gx = [(xi, c["gamma"]) for xi, c in zip(x, mine) if not np.isnan(c["gamma"])]
        if gx:
            ax.plot(*zip(*gx), linestyle="none", marker="_", markersize=16, markeredgewidth=2, color="black")
    bound: dict[float, list[tuple[float, float]]] = {}
    for c in cells:
        if not np.isnan(c["gamma"]) and not np.isnan(c["strength"]):
            bound.setdefault(c["strength"], []).append((c["gamma"], c["eps"]))
    if bound:
        bx = sorted(bound)
        gammas = [float(np.mean([g for g, _ in bound[b]])) for b in bx]
        handles["bound γ (any attacker)"] = ax.plot(bx, gammas, color="black", marker="_", markersize=16,
                                                    markeredgewidth=2, linewidth=1.0)[0]
        for b, g in zip(bx, gammas):
            eps = [e for _, e in bound[b] if not np.isnan(e)]
            if eps:
                ax.annotate(f"ε={np.median(eps):.2g}", (b, g), fontsize=7, xytext=(4, 4), textcoords="offset points")
    kappas = [c["kappa"] for c in cells if not np.isnan(c["kappa"])]
    if kappas:
        handles["κ = 1/n (chance)"] = ax.axhline(float(np.median(kappas)), color="grey", linestyle="--", linewidth=1)
    if log:
        ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    name = _strength_name(str(cells[0]["defense"]))
    ax.set_xlabel("defense strength" + (f": {name}" if name else ""))
    ax.set_ylabel("identification accuracy", fontsize=9)
    ax.grid(alpha=0.3)
