"""``nexttools extract RUN``: parse options, call :func:`nexttools.extract.extract`, print its summary."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.table import Table

from nexttools.cli import on_rank_zero
from nexttools.cli.options import declared
from nexttools.console import console
from nexttools.extract import ExtractOptions, ExtractSummary, extract


@click.command("extract")
@declared(ExtractOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def extract_command(as_json: bool, **values: Any) -> None:
    """Extract the rank-1 trajectory of every trained module of RUN into the store.

    Re-running it after training went on adds only the new checkpoints.
    """
    summary = extract(ExtractOptions(**values))
    if not on_rank_zero():
        return
    if as_json:
        click.echo(json.dumps(summary.to_json(), indent=2))
    else:
        console.print(summary_table(summary))


def summary_table(summary: ExtractSummary) -> Table:
    """The human summary: what the store holds and what this run computed."""
    table = Table(title="trajectory store", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    steps = summary.steps
    shown = ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, … {steps[-1]}"
    table.add_row("store", str(summary.store))
    table.add_row("run", summary.run_kind)
    table.add_row("checkpoints", str(summary.checkpoints))
    table.add_row("steps", shown)
    table.add_row("modules", f"{summary.modules} rank-1 ({summary.carried} carried as absolute tensors)")
    if summary.run_kind == "lora":
        table.add_row("rank", " / ".join(map(str, summary.ranks)))
        table.add_row("scaling rule", summary.scaling_rule)
    table.add_row("k (target horizon)", str(summary.k))
    computed = summary.rows_computed
    state = "rebuilt, " if summary.rebuilt else ""
    if not summary.written:
        state = "up to date, nothing "
    table.add_row(
        "rows computed",
        f"{state}global {computed['global']}, local {computed['local']}, target {computed['target']}",
    )
    if summary.consistency is not None:
        figures = summary.consistency
        lags = "  ".join(f"{x:.2f}" for x in figures.overall_lag_cosine)
        table.add_row("local-delta cosine by lag", f"{lags} (lag 1 … {figures.k}; a random walk: 0)")
        table.add_row(
            f"straightness over k={figures.k}",
            f"{figures.overall_straightness:.3f} (a straight line: 1, a random walk: "
            f"{figures.random_walk_straightness:.3f})",
        )
    if summary.energy_ratio is None:
        table.add_row("rank-1 energy σ1/Σσᵢ", "n/a (full-weight run)")
    else:
        lo, median, hi = summary.energy_ratio
        table.add_row(
            "rank-1 energy σ1/Σσᵢ", f"min {lo:.3f}  median {median:.3f}  max {hi:.3f} (last global delta)"
        )
    return table
