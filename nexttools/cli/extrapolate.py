"""``nexttools extrapolate``: the jump of a method (the registry's), written in an output format (ditto)."""

from __future__ import annotations

import json
from typing import Any

import click

from nexttools.cli import on_rank_zero
from nexttools.cli.options import command_line, declared
from nexttools.console import console
from nexttools.disk import human_bytes
from nexttools.extrapolate import ExtrapolateOptions, extrapolate
from nexttools.hub import PushOptions, push
from nexttools.methods import METHODS
from nexttools.outputs import OUTPUTS


def _listing(title: str, entries: dict[str, str]) -> str:
    """A help section listing each registry entry with its one-line summary."""
    width = max(len(name) for name in entries)
    lines = "\n".join(f"  {name.ljust(width)}  {summary}" for name, summary in entries.items())
    return f"\b\n{title}:\n{lines}"


EPILOG = "\n\n".join(
    (
        _listing("Methods (--method)", {name: method.summary for name, method in METHODS.items()}),
        _listing("Formats (--format)", {name: output.summary for name, output in OUTPUTS.items()}),
    )
)


@click.command("extrapolate", epilog=EPILOG)
@declared(ExtrapolateOptions)
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Then push the output.")
@declared(PushOptions, only=("private", "token", "endpoint"))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def extrapolate_command(
    push_to_hub: str | None,
    private: bool,
    token: str | None,
    endpoint: str | None,
    as_json: bool,
    **values: Any,
) -> None:
    """Jump the run ahead: write the last checkpoint moved α·T̂ along its predicted trajectory.

    \b
    nexttools extrapolate                  # backtest's (or fit's) choice, written to resume in place
    nexttools extrapolate --alpha 1.5      # a LoRA run: a new base for your own last checkpoint
    nexttools extrapolate --method factor-linear --format checkpoint   # a resumable checkpoint-N copy
    nexttools extrapolate --format merged  # a restart (fresh LoRA, fresh optimizer): loses steps
    """
    from nexttools.errors import UserError

    options = ExtrapolateOptions(**values, command=command_line())
    summary = extrapolate(options)
    if options.dry_run:
        console.print(
            f"dry run: would write {summary.out} ({summary.format}, {summary.method}, α = {summary.alpha:g}, "
            f"k = {summary.k}, {summary.dtype}, {summary.shards} shard(s), "
            f"{human_bytes(summary.total_bytes)})"
        )
        for name, size in summary.files.items():
            console.print(f"  {name}  {human_bytes(size)}")
    document = summary.document()
    if push_to_hub and not options.dry_run and on_rank_zero():
        try:
            target = PushOptions(summary.out, push_to_hub, private=private, token=token, endpoint=endpoint)
            pushed = push(target)
        except UserError as error:  # the model is written and whole: say how to retry the push alone
            raise UserError(
                f"{error} (the output is complete at {summary.out}; retry with `nexttools push`)"
            ) from error
        console.print(f"Pushed to {pushed.repo_url}: {pushed.commit_url}", soft_wrap=True)
        document["push"] = pushed.to_json()
    if as_json and on_rank_zero():
        click.echo(json.dumps(document, indent=2))
