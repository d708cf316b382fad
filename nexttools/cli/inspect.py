"""``nexttools inspect``: parse options, call :func:`nexttools.inspect_run.inspect`, print its tables."""

from __future__ import annotations

import json
import math
from typing import Any

import click
import numpy as np
from rich.table import Table

from nexttools.cli.options import declared
from nexttools.cli.tables import diverging, method_header
from nexttools.console import console
from nexttools.inspect_run import Inspection, InspectOptions, inspect


@click.command("inspect")
@declared(InspectOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON on stdout.")
def inspect_command(as_json: bool, **values: Any) -> None:
    """The paper's §3 analysis on your run: rank-1 energy, linearity (R²), consistency per module kind.

    Reads the store (and the LoRA checkpoints, for the energy ratio); run after `extract`, and after
    `fit` to see its skill per module kind beside the consistency figures.
    """
    options = InspectOptions(**values)
    inspection = inspect(options.workdir, options.store)
    if inspection.energy is not None:
        console.print(_energy_table(inspection))
    console.print(_r2_table(inspection))
    console.print(_kind_table(inspection))
    if inspection.skill:
        console.print(_skill_table(inspection))
    if options.plot is not None:
        from nexttools.plots import write_plot

        console.print(f"wrote {write_plot(inspection, options.plot)}")
    if as_json:
        click.echo(json.dumps(inspection.document(), indent=2))


def _figure(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _energy_table(inspection: Inspection) -> Table:
    assert inspection.energy is not None
    table = Table(title="rank-1 energy ratio σ₁/Σσᵢ of ΔW over modules (paper fig. 2)", title_justify="left")
    for column in ("step", "min", "median", "max"):
        table.add_column(column, justify="right")
    for step, row in zip(inspection.steps, inspection.energy, strict=True):
        cells = (
            [np.nanmin(row), np.nanmedian(row), np.nanmax(row)] if not np.isnan(row).all() else [math.nan] * 3
        )
        table.add_row(str(step), *(_figure(float(x)) for x in cells))
    return table


def _r2_table(inspection: Inspection) -> Table:
    table = Table(
        title=f"R² of a linear rank-1 fit on the first {inspection.fit_rows} checkpoints predicting the next "
        f"{inspection.predict_rows}, over modules (paper fig. 3)",
        title_justify="left",
    )
    table.add_column("R²")
    table.add_column("modules", justify="right")
    table.add_column("share", justify="right")
    histogram = inspection.r2_histogram()
    total = max(sum(count for _, count in histogram), 1)
    for label, count in histogram:
        table.add_row(label, str(count), f"{count / total:.0%}")
    return table


def _kind_table(inspection: Inspection) -> Table:
    table = Table(title="consistency per module kind", title_justify="left")
    table.add_column("module")
    for header in ("median\nR²", "lag-1\ncosine", "straight-\nness"):
        table.add_column(header, justify="right")
    kinds = list(dict.fromkeys(inspection.kinds))
    r2 = np.array(inspection.r2)
    for kind in [*kinds, "overall"]:
        chosen = np.array([k == kind or kind == "overall" for k in inspection.kinds])
        live = r2[chosen][~np.isnan(r2[chosen])]
        figures = inspection.overall if kind == "overall" else inspection.by_kind.get(kind)
        cosine = (
            figures.overall_lag_cosine[0]
            if figures is not None and len(figures.overall_lag_cosine)
            else math.nan
        )
        straight = figures.overall_straightness if figures is not None else math.nan
        cells = [
            _figure(float(np.median(live)) if live.size else math.nan),
            _figure(cosine),
            _figure(straight),
        ]
        table.add_row(kind, *cells, style="bold" if kind == "overall" else None)
    return table


def _skill_table(inspection: Inspection) -> Table:
    """``fit``'s full-space skill S per module kind and method (parameter space)."""
    table = Table(title="fit's skill S per module kind (parameter space)", title_justify="left")
    table.add_column("module")
    for method in inspection.skill:
        table.add_column(method_header(method), justify="right")
    for kind in [*dict.fromkeys(inspection.kinds), "overall"]:
        cells = [diverging(skill.get(kind, math.nan)) for skill in inspection.skill.values()]
        table.add_row(kind, *cells, style="bold" if kind == "overall" else None)
    return table
