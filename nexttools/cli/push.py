"""``nexttools push OUT REPO_ID``: upload an extrapolated output folder to the Hugging Face Hub."""

from __future__ import annotations

import json
from typing import Any

import click

from nexttools.cli.options import declared
from nexttools.console import console
from nexttools.hub import PushOptions, push


@click.command("push")
@declared(PushOptions)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def push_command(as_json: bool, **values: Any) -> None:
    """Upload the nexttools output FOLDER (weights, config, tokenizer, card, manifest) to REPO_ID.

    FOLDER must be a complete, unmodified output of `nexttools extrapolate`; it is checked before any
    network call. An existing README.md in the repo is kept unless --overwrite-card.
    """
    result = push(PushOptions(**values))
    if result.pr_url:
        console.print(f"Opened pull request {result.pr_url}", soft_wrap=True)
    console.print(
        f"Pushed {len(result.files)} files to {result.repo_url}: {result.commit_url}", soft_wrap=True
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
