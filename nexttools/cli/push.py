"""``nexttools push OUT REPO_ID``: upload an extrapolated output folder to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nexttools.cli import cli
from nexttools.console import console


@cli.command("push")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.argument("repo_id")
@click.option(
    "--private",
    is_flag=True,
    help="Create the repo private (a new repo otherwise follows its owner's default).",
)
@click.option(
    "--revision", default=None, help="Branch to commit to; created from main when missing.  [default: main]"
)
@click.option(
    "--create-pr", is_flag=True, help="Open a pull request against main instead of committing to it."
)
@click.option("--commit-message", default=None, help="Commit title.  [default: method, α, k and step]")
@click.option(
    "--token",
    default=None,
    show_default=False,
    help="Hub access token.  [default: HF_TOKEN or the saved `hf auth login`]",
)
@click.option(
    "--endpoint",
    envvar="HF_ENDPOINT",
    default=None,
    show_envvar=True,
    help="Hub URL.  [default: https://huggingface.co]",
)
@click.option("--overwrite-card", is_flag=True, help="Replace a README.md that the repo already has.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def push_command(
    folder: Path,
    repo_id: str,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    token: str | None,
    endpoint: str | None,
    overwrite_card: bool,
    as_json: bool,
) -> None:
    """Upload the nexttools output FOLDER (weights, config, tokenizer, card, manifest) to REPO_ID.

    FOLDER must be a complete, unmodified output of `nexttools extrapolate`; it is checked before any
    network call. An existing README.md in the repo is kept unless --overwrite-card.
    """
    from nexttools.hub import push  # huggingface_hub's HTTP stack is only loaded by the command that needs it

    result = push(
        folder,
        repo_id,
        private=private,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        token=token,
        endpoint=endpoint,
        overwrite_card=overwrite_card,
    )
    if result.pr_url:
        console.print(f"Opened pull request {result.pr_url}", soft_wrap=True)
    console.print(
        f"Pushed {len(result.files)} files to {result.repo_url}: {result.commit_url}", soft_wrap=True
    )
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=2))
