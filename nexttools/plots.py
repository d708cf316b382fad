"""``inspect --plot``: the four panels of the inspection as one PNG (matplotlib, an optional extra).

(a) the rank-1 energy ratio against the step, median and range over modules (paper figure 2);
(b) the histogram of R² of linear rank-1 prediction over modules (paper figure 3);
(c) the local-delta cosine against the lag, per module kind and overall (a random walk is 0);
(d) per module kind: straightness against the random-walk value, and the back-test's skill S of
    each method when ``fit`` recorded one.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from nexttools.errors import UserError
from nexttools.inspect_run import Inspection
from nexttools.safe_files import write_atomic

if TYPE_CHECKING:
    from matplotlib.axes import Axes

INSTALL_HINT = "pip install 'nexttools[plots]'"


def write_plot(inspection: Inspection, out: Path) -> Path:
    """Draw the four panels into ``out`` (PNG); ``UserError`` naming the extra when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError(f"--plot needs matplotlib, an optional extra: {INSTALL_HINT}") from None
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5), constrained_layout=True)
    _energy(axes[0, 0], inspection)
    _r2(axes[0, 1], inspection)
    _lag_cosine(axes[1, 0], inspection)
    _by_kind(axes[1, 1], inspection)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image = io.BytesIO()
    try:
        figure.savefig(image, format="png", dpi=110)
    finally:
        plt.close(figure)
    write_atomic(out, image.getvalue())
    return out


def _energy(ax: Axes, inspection: Inspection) -> None:
    ax.set_title("(a) rank-1 energy ratio σ₁/Σσᵢ of ΔW")
    if inspection.energy is None:
        ax.text(0.5, 0.5, "full-weight run: not computed", ha="center", va="center", transform=ax.transAxes)
        return
    steps, energy = inspection.steps, inspection.energy
    ax.fill_between(steps, np.nanmin(energy, axis=1), np.nanmax(energy, axis=1), alpha=0.25, label="range")
    ax.plot(steps, np.nanmedian(energy, axis=1), marker="o", label="median over modules")
    ax.set_xlabel("step")
    ax.set_ylim(0, 1)
    ax.legend()


def _r2(ax: Axes, inspection: Inspection) -> None:
    ax.set_title(
        f"(b) R² of a linear rank-1 fit on {inspection.fit_rows} checkpoints, "
        f"predicting {inspection.predict_rows}"
    )
    labels, counts = zip(*inspection.r2_histogram(), strict=True)
    total = max(sum(counts), 1)
    ax.bar(labels, [100 * c / total for c in counts])
    ax.set_ylabel("% of modules")
    ax.set_xlabel("R²")


def _lag_cosine(ax: Axes, inspection: Inspection) -> None:
    ax.set_title("(c) cosine of local deltas against the lag (random walk: 0)")
    if inspection.overall is None:
        ax.text(0.5, 0.5, "no Gram band in this store: re-run extract", ha="center", transform=ax.transAxes)
        return
    lags = np.arange(1, inspection.overall.k + 1)
    for kind, figures in inspection.by_kind.items():
        ax.plot(lags, figures.overall_lag_cosine, marker=".", alpha=0.6, label=kind)
    ax.plot(lags, inspection.overall.overall_lag_cosine, color="black", linewidth=2.5, label="overall")
    ax.axhline(0, color="grey", linestyle=":")
    ax.set_xlabel("lag (checkpoints)")
    ax.set_xticks(lags)
    ax.legend(fontsize="small", ncols=2)


def _by_kind(ax: Axes, inspection: Inspection) -> None:
    kinds = list(inspection.by_kind)
    if not kinds:
        ax.set_title("(d) per module kind")
        ax.text(0.5, 0.5, "no Gram band in this store", ha="center", transform=ax.transAxes)
        return
    x = np.arange(len(kinds))
    series = {"straightness": [inspection.by_kind[k].overall_straightness for k in kinds]}
    series |= {
        f"S {method}": [skill.get(k, np.nan) for k in kinds] for method, skill in inspection.skill.items()
    }
    width = 0.8 / len(series)
    for n, (label, values) in enumerate(series.items()):
        ax.bar(x + (n - (len(series) - 1) / 2) * width, values, width, label=label)
    walk = inspection.by_kind[kinds[0]].random_walk_straightness
    ax.axhline(walk, color="grey", linestyle=":", label=f"random walk ({walk:.2f})")
    ax.set_xticks(x, kinds, rotation=30)
    ax.set_ylim(-1, 1.05)
    ax.set_title("(d) straightness, and fit's skill S (clipped at −1), per module kind")
    ax.legend(fontsize="small", ncols=2)
