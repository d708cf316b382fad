"""``nexttools fit``: parse options, call :func:`nexttools.fit.fit`, print the back-test."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.table import Table

from nexttools.cli import cli
from nexttools.cli.options import Count, Seed, workdir_options
from nexttools.console import console
from nexttools.device import DEVICE_HELP
from nexttools.fit import FitOptions, FitResult, fit
from nexttools.methods import METHODS
from nexttools.predictor import DEFAULT_DEPTH, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_WIDTH


@cli.command("fit")
@workdir_options
@click.option("--epochs", type=Count, default=DEFAULT_EPOCHS, help="Full-batch training steps.")
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_LR, help="AdamW learning rate."
)
@click.option("--width", type=Count, default=DEFAULT_WIDTH, help="Hidden units per layer.")
@click.option("--depth", type=Count, default=DEFAULT_DEPTH, help="Layers per encoder/decoder.")
@click.option(
    "--seed", type=Seed, default=0, help="Seed of the initialisation (same seed, same predictor on CPU)."
)
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option(
    "--holdout",
    type=Count,
    help="Target rows held out for the back-test [default: a third of them, at least 1].",
)
@click.option("--refit/--no-refit", default=True, help="Retrain on every target row after the back-test.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace a predictor trained on another store file (refitting the same, grown store needs none).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the back-test and predictor as JSON on stdout.")
def fit_command(
    workdir: Path,
    store: Path | None,
    epochs: int,
    lr: float,
    width: int,
    depth: int,
    seed: int,
    device: str,
    holdout: int | None,
    refit: bool,
    force: bool,
    as_json: bool,
) -> None:
    """Train the NExt predictor on the store and back-test it against linear extrapolation.

    The last --holdout target rows are held out: the predictor trained on the others, and the
    linear-rank1 and last-interval baselines, predict them; the table gives the cosine between
    predicted and true target deltas and the σ error per module kind.
    """
    result = fit(
        FitOptions(
            workdir=workdir,
            store=store,
            epochs=epochs,
            lr=lr,
            width=width,
            depth=depth,
            seed=seed,
            device=device,
            holdout=holdout,
            refit=refit,
            force=force,
        )
    )
    console.print(backtest_table(result))
    console.print(result.backtest.summary, soft_wrap=True)
    console.print(f"predictor: {result.weights_path} (train loss {result.train_loss:.4g})", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result.document(), indent=2))


def backtest_table(result: FitResult) -> Table:
    """Cosine and σ error of every method, per module kind and overall (σ-weighted means)."""
    backtest = result.backtest
    table = Table(
        title=f"back-test on the last {backtest.holdout_rows} target row(s), "
        f"trained on {backtest.train_rows}",
        title_justify="left",
    )
    table.add_column("module")
    for method in METHODS:
        table.add_column(f"{method}\ncosine  σ err", justify="right")
    kinds = next(s for s in backtest.methods.values() if s is not None).cosine
    for kind in [*(k for k in kinds if k != "overall"), "overall"]:
        cells = []
        for method in METHODS:
            score = backtest.methods[method]
            if score is None or kind not in score.cosine:
                cells.append("n/a")
            else:
                cells.append(f"{score.cosine[kind]:.3f}  {score.sigma_rel_err[kind]:5.1%}")
        table.add_row(kind, *cells, style="bold" if kind == "overall" else None)
    return table
