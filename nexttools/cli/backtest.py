"""``nexttools backtest --eval-cmd CMD``: parse options, call :func:`nexttools.advisor.backtest`, print it."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from nexttools.advisor import BacktestOptions, Verdict, backtest
from nexttools.cli.options import declared
from nexttools.cli.tables import diverging
from nexttools.console import console
from nexttools.verdict import MIN_WORTH
from nexttools.workdir import Workdir


@click.command("backtest")
@declared(BacktestOptions)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON on stdout.")
def backtest_command(as_json: bool, **values: Any) -> None:
    """Say whether to jump, how far and with which method, scored by your own eval.

    From earlier checkpoints (--origins of them, ending at --origin), using only what the run knew
    then, every method jumps at every α; each jump and each real checkpoint after the origin is
    written merged into a scratch folder, scored by --eval-cmd and deleted. A jump's worth is the real
    steps it matched divided by the steps it claims (1 perfect, 0 useless, negative harmful); it is
    recommended only if it is worth at least 0.5 from every origin.

    \b
    Example:
      nexttools backtest --eval-cmd "python eval.py --model {model} --n 200"
    """
    options = BacktestOptions(**values)
    verdict = backtest(options)
    console.print(_real_table(verdict))
    console.print(_jump_table(verdict))
    if len(verdict.origin_steps) > 1:
        console.print(_spread_table(verdict))
    for name, reason in verdict.skipped.items():
        console.print(f"{name}: not tried ({escape(reason)})", soft_wrap=True)
    if verdict.recommendation is None:
        console.print(f"[bold]do not extrapolate this run[/bold]: {escape(verdict.reason)}.", soft_wrap=True)
    else:
        method, alpha = verdict.recommendation
        console.print(
            f"[bold]recommendation: --method {method} --alpha {alpha:g}[/bold]: {escape(verdict.reason)}.",
            soft_wrap=True,
        )
    console.print(
        f"{verdict.evaluated} evaluation(s) run, {verdict.cached} from the cache; "
        f"verdict saved to {Workdir(options.workdir).verdict}",
        soft_wrap=True,
    )
    if as_json:
        click.echo(json.dumps(verdict.document(), indent=2))


def _real_table(verdict: Verdict) -> Table:
    table = Table(title=f"real run from the origin (step {verdict.origin_step})", title_justify="left")
    table.add_column("step", justify="right")
    table.add_column("score", justify="right")
    for step, score in verdict.real:
        table.add_row(str(step), f"{score:.4g}")
    return table


def _jump_table(verdict: Verdict) -> Table:
    table = Table(
        title=f"jumps from step {verdict.origin_step}: worth = real steps matched / steps claimed "
        f"(≥ means a lower bound; under {MIN_WORTH} does not pay)",
        title_justify="left",
    )
    for column in ("method", "α", "score", "steps\nclaimed", "steps\nworth", "worth"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in verdict.results:
        bound = "≥ " if r.lower_bound else ""
        chosen = verdict.recommendation == (r.method, r.alpha)
        table.add_row(
            r.method,
            f"{r.alpha:g}",
            f"{r.score:.4g}",
            f"{r.claimed_steps:.0f}",
            f"{bound}{r.steps_worth:.1f}" if r.worth >= -1 else "–",
            f"{bound}{diverging(r.worth, 2)}",
            style="bold green" if chosen else None,
        )
    return table


def _spread_table(verdict: Verdict) -> Table:
    steps = ", ".join(str(s) for s in verdict.origin_steps)
    table = Table(title=f"worth over the origins (steps {steps})", title_justify="left")
    for column in ("method", "α", "steps\nclaimed", "steps\nworth", "worth\nmean ± sd", "worth\nmin"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for s in verdict.spreads:
        chosen = verdict.recommendation == (s.method, s.alpha)
        bound = "≥ " if s.lower_bound else ""
        table.add_row(
            s.method,
            f"{s.alpha:g}",
            f"{s.claimed_steps:.0f}",
            f"{bound}{s.steps_worth_mean:.1f}" if s.worth_mean >= -1 else "–",
            f"{diverging(s.worth_mean, 2)} ± {s.worth_sd:.2f}" if s.worth_mean >= -1 else "< −1",
            diverging(s.worth_min, 2),
            style="bold green" if chosen else None,
        )
    return table
