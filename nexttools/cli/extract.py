"""``nexttools extract RUN``: parse options, call :func:`nexttools.extract.extract`, print its summary."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from nexttools.cli import cli
from nexttools.cli.options import MAX_STEP, Count, workdir_options
from nexttools.console import console
from nexttools.device import DEVICE_HELP
from nexttools.errors import UserError
from nexttools.extract import ExtractOptions, ExtractSummary, extract


def _parse_steps(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> tuple[int | None, int | None] | None:
    """``LO:HI`` (inclusive; either end may be empty) -> (lo, hi)."""
    if value is None:
        return None
    lo, sep, hi = value.partition(":")
    try:
        bounds = (int(lo) if lo.strip() else None, int(hi) if hi.strip() else None)
    except ValueError:
        bounds = None
    if not sep or bounds is None or bounds == (None, None):
        raise UserError(f"--steps {value!r}: expected LO:HI, e.g. 10:150, 100: or :80")
    if any(b is not None and not 0 <= b <= MAX_STEP for b in bounds):
        raise UserError(f"--steps {value!r}: steps are between 0 and {MAX_STEP}")
    if bounds[0] is not None and bounds[1] is not None and bounds[0] > bounds[1]:
        raise UserError(f"--steps {value!r}: LO is greater than HI")
    return bounds


@cli.command("extract")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--base", help="Base model: local folder or Hub id [default: the adapters' base_model_name_or_path]."
)
@workdir_options
@click.option("--k", type=Count, default=5, help="Target horizon, in checkpoints.")
@click.option(
    "--steps", callback=_parse_steps, metavar="LO:HI", help="Only checkpoints with LO <= step <= HI."
)
@click.option("--every", type=Count, help="Only checkpoints whose step is a multiple of N.")
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def extract_command(
    run: Path,
    base: str | None,
    workdir: Path,
    store: Path | None,
    k: int,
    steps: tuple[int | None, int | None] | None,
    every: int | None,
    device: str,
    as_json: bool,
) -> None:
    """Extract the rank-1 trajectory of every trained module of RUN into the store.

    Re-running it after training went on adds only the new checkpoints.
    """
    options = ExtractOptions(
        run=run,
        base=base,
        workdir=workdir,
        store=store,
        k=k,
        steps=steps,
        every=every,
        device=device,
    )
    summary = extract(options)
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
