"""What every figure and table of the report shares: palette, metric labels and directions, how
leakage is drawn (the prior-only band, the display cap). A leaf of the report modules, so that
:mod:`defenda.harness.report` and :mod:`defenda.harness.report_trust` both import it without a cycle."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Okabe–Ito: a colour-blind-safe palette.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
METRIC_LABELS = {
    "psnr": "leakage: PSNR of reconstruction (dB) ↑ worse privacy",
    "ssim": "leakage: SSIM of reconstruction ↑ worse privacy",
    "lpips": "leakage: LPIPS distance ↓ worse privacy",
    "label_acc": "leakage: label accuracy ↑ worse privacy",
    "mae": "leakage: MAE of features (std units) ↓ worse privacy",
    "mse": "leakage: MSE of features ↓ worse privacy",
}
HIGHER_IS_WORSE = {"psnr": True, "ssim": True, "label_acc": True, "lpips": False, "mae": False, "mse": False,
                   "feature_acc": True, "exact_rate": True, "recognised_rate": True, "ident_acc": True}
#: PSNR above this is drawn at it (exact recoveries reach 150-250 dB and would flatten every other curve)
PSNR_CEILING = 80.0
#: error metrics (MAE, MSE, LPIPS) are drawn up to this multiple of the worse prior-only guess: an error
#: several times what a guess without any update achieves is "no leakage" whatever its size, and a
#: diverged reconstruction (MAE 10⁶) would otherwise flatten every other curve
DISPLAY_MULTIPLE = 3.0
#: the legend entry of the prior-only band
PRIOR_LABEL = "prior only (no update)"


def plt_module() -> Any:
    """matplotlib.pyplot on the non-interactive backend (reports are written without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def strength_param_of(defense: str) -> Any:
    """The strength parameter of ``defense`` (the last component with one for a composed defense), or
    None when it has none or its plugin is not installed (the report needs no plugin)."""
    try:
        from defenda.params import strength_param
        from defenda.plugins import get_plugins

        registry: Any = get_plugins().registry
        for part in reversed(defense.split("+")):
            sp = strength_param(registry.get("defense", part.strip()).cls.Params)
            if sp is not None:
                return sp
    except Exception:  # an uninstalled or broken plugin: the report still renders
        pass
    return None


def legend_bottom(entries: int, cols: int, height: float) -> float:
    """The fraction of a figure ``height`` inches tall that a bottom legend of ``entries`` in ``cols``
    columns takes (0.3 in of margin, 0.25 in per legend row)."""
    return (0.3 + 0.25 * math.ceil(entries / max(1, cols))) / height


def finish_figure(plt: Any, fig: Any, axes: Any, used: int, handles: dict[str, Any], *, title: str, ncol: int,
                  rect: tuple[float, float, float, float], path: Path, svg: bool = False) -> Path:
    """Blank the unused panels, add the shared bottom legend and the title, lay out inside ``rect``,
    save ``path`` (and its SVG twin) with a tight bounding box — long titles of one-panel figures
    stay whole — and close the figure."""
    for ax in list(axes.flat)[used:]:
        ax.axis("off")
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=130, bbox_inches="tight")
    if svg:
        fig.savefig(path.with_suffix(".svg"), bbox_inches="tight")
    plt.close(fig)  # through the caller's pyplot (tests record figures there)
    return path


@dataclass(frozen=True)
class Display:
    """How one task's leakage metric is drawn.

    :param band: (low, high): the medians, over the task's trials, of the two prior-only guesses (the
        public mean, a random public sample); None for rows without a baseline.
    :param cap: values beyond it are drawn at it (PSNR: above; error metrics: above); None: no cap.
    :param cap_text: the label of the cap line.
    """

    metric: str
    band: tuple[float, float] | None = None
    cap: float | None = None
    cap_text: str = ""


def display_for(rows: Any, metric: str) -> Display:
    """The band and cap of ``metric`` over ``rows`` (one task's ok rows, with the ``prior_*`` columns)."""
    medians = [float(np.nanmedian(rows[c])) for c in (f"prior_mean:{metric}", f"prior_sample:{metric}")
               if c in rows and rows[c].notna().any()]
    band = (min(medians), max(medians)) if medians else None
    if metric == "psnr":
        return Display(metric, band, PSNR_CEILING, f"≥ {PSNR_CEILING:g} dB (exact) drawn here")
    if HIGHER_IS_WORSE.get(metric, True):
        return Display(metric, band)
    if band is not None and band[1] > 0:
        return Display(metric, band, DISPLAY_MULTIPLE * band[1],
                       f"≥ {DISPLAY_MULTIPLE * band[1]:.3g} ({DISPLAY_MULTIPLE:g}× the prior-only guess) drawn here")
    # no baseline in the rows (an old store): the data's own scale, a multiple of its median
    values = rows[metric].astype(float) if metric in rows else None
    values = values[np.isfinite(values) & (values > 0)] if values is not None else None
    if values is None or values.empty:
        return Display(metric, band)
    cap = DISPLAY_MULTIPLE * float(values.median())
    return Display(metric, band, cap, f"≥ {cap:.3g} ({DISPLAY_MULTIPLE:g}× the median) drawn here")


def clip_for_display(agg: Any, disp: Display) -> tuple[Any, float | None]:
    """``agg`` (columns leak, leak_lo, leak_hi) with values beyond the cap drawn at it (tables and
    exports keep the measured values); the cap if a value was clipped, else None."""
    if disp.cap is None:
        return agg, None
    clipped = bool((agg["leak_hi"] > disp.cap).any())
    agg = agg.assign(**{c: agg[c].clip(upper=disp.cap) for c in ("leak", "leak_lo", "leak_hi")})
    return agg, (disp.cap if clipped else None)


def mark_cap(ax: Any, disp: Display, clipped: float | None) -> None:
    """A dotted line where clipped values are drawn, with what it means."""
    if clipped is not None:
        ax.axhline(clipped, color="grey", linestyle=":", linewidth=1)
        ax.annotate(disp.cap_text, (0.01, clipped), xycoords=("axes fraction", "data"),
                    xytext=(0, -10), textcoords="offset points", fontsize=7, color="grey")


def draw_band(ax: Any, disp: Display, handles: dict[str, Any]) -> None:
    """The prior-only band behind a panel's curves (edges drawn too: the two guesses may coincide)."""
    if disp.band is None:
        return
    from matplotlib.patches import Patch

    lo, hi = disp.band
    ax.axhspan(lo, hi, color="#999999", alpha=0.25, linewidth=0, zorder=0)
    for y in {lo, hi}:
        ax.axhline(y, color="#777777", linewidth=0.7, zorder=0)
    handles[PRIOR_LABEL] = Patch(facecolor="#999999", alpha=0.45, edgecolor="#777777")


def beats(leak: float, prior: float, metric: str) -> bool | None:
    """Whether a leakage value is worse for privacy than the prior-only guess (None: no comparison)."""
    if leak is None or prior is None or not (np.isfinite(leak) and np.isfinite(prior)):
        return None
    return leak > prior if HIGHER_IS_WORSE.get(metric, True) else leak < prior


#: appended to a leakage cell that does not beat the prior-only guess
NOT_BEATEN = "≤ prior"


def fmt_value(v: float | None) -> str:
    """A leakage value for a table: two decimals, or three significant digits when huge (a diverged
    reconstruction's MAE of 10¹⁵ would otherwise be a sixteen-digit cell)."""
    if v is None or not np.isfinite(v):
        return ""
    return f"{v:.2f}" if abs(v) < 1e4 else f"{v:.3g}"


def leak_cells(leak: float, prior: float, metric: str, with_prior: bool = True) -> str:
    """``"value | prior"`` table cells: the value marked when it does not beat the prior (two cells;
    the value alone without ``with_prior``: rows of an old store have no baseline to show)."""
    value, base = fmt_value(leak), fmt_value(prior)
    if beats(leak, prior, metric) is False:
        value += f" {NOT_BEATEN}"
    return f"{value} | {base}" if with_prior else value


def has_prior(rows: Any, metric: str) -> bool:
    """Whether the rows carry a prior-only baseline of ``metric`` (stores before issue 14 do not)."""
    return f"prior:{metric}" in rows and bool(rows[f"prior:{metric}"].notna().any())
