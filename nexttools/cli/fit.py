"""``nexttools fit``: parse options, call :func:`nexttools.fit.fit`, print the back-test."""

from __future__ import annotations

import json
import math
from typing import Any

import click
from rich.table import Table

from nexttools.cli.options import declared
from nexttools.cli.tables import diverging, method_header
from nexttools.console import console
from nexttools.fit import FitOptions, FitResult, fit
from nexttools.methods import METHODS


@click.command("fit")
@declared(FitOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the back-test and predictor as JSON on stdout.")
def fit_command(as_json: bool, **values: Any) -> None:
    """Train the NExt predictor on the store and back-test every method against the run's future.

    The last --holdout target rows are held out. From each of those checkpoints every method jumps
    as it is applied (the predictor trained on the earlier rows); the first table gives, per module
    kind, the skill S = 1 − Σ‖αT̂ − T‖²/Σ‖T‖² against the true k-checkpoint change T (1 perfect, 0
    no better than not jumping) and α*, the α that maximises S. The second gives the rank-1 cosine
    and σ error from the store alone.
    """
    result = fit(FitOptions(**values))
    if result.backtest.skill is not None:
        console.print(skill_table(result))
    console.print(backtest_table(result))
    console.print(result.backtest.summary, soft_wrap=True)
    console.print(f"predictor: {result.weights_path} (train loss {result.train_loss:.4g})", soft_wrap=True)
    if as_json:
        click.echo(json.dumps(result.document(), indent=2))


def skill_table(result: FitResult) -> Table:
    """Full-space skill S at the requested α and α* of every method, per module kind and overall."""
    backtest = result.backtest
    assert backtest.skill is not None
    scores = backtest.skill
    alpha = next((s.alpha for s in scores.values() if s is not None), math.nan)
    return _method_table(
        f"parameter space: the full-space back-test on the last {backtest.holdout_rows} checkpoint(s) "
        f"with a known future, skill S at α={alpha:g} (< −1: diverges) over α*",
        "S\nα*",
        {
            name: {kind: f"{diverging(s.skill[kind])}\n{s.alpha_star[kind]:.2f}" for kind in s.skill}
            for name, s in scores.items()
            if s is not None
        },
    )


def backtest_table(result: FitResult) -> Table:
    """Cosine and σ error of every method, per module kind and overall (σ-weighted means)."""
    backtest = result.backtest
    return _method_table(
        f"parameter space: the rank-1 back-test (store only) on the last {backtest.holdout_rows} "
        f"target row(s), trained on {backtest.train_rows}: cosine over σ error",
        "cos\nσ err",
        {
            name: {kind: f"{s.cosine[kind]:.3f}\n{s.sigma_rel_err[kind]:.1%}" for kind in s.cosine}
            for name, s in backtest.methods.items()
            if s is not None
        },
    )


def _method_table(title: str, heading: str, cells: dict[str, dict[str, str]]) -> Table:
    """Methods as columns (every registered one; "n/a" where not scored), module kinds as rows, the
    "overall" row last and bold. ``cells``: method -> kind -> formatted figures."""
    table = Table(title=title, title_justify="left")
    table.add_column("module\n" + heading.replace("\n", " / "))
    for method in METHODS:
        table.add_column(method_header(method), justify="right")
    kinds = list(dict.fromkeys(kind for by_kind in cells.values() for kind in by_kind if kind != "overall"))
    for kind in [*kinds, "overall"]:
        row = [cells.get(method, {}).get(kind, "n/a") for method in METHODS]
        table.add_row(kind, *row, style="bold" if kind == "overall" else None)
    return table
