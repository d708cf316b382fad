"""``nexttools extrapolate``: the jump of a method (the registry's), written in an output format (ditto)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from nexttools.cli import cli
from nexttools.cli.options import workdir_options
from nexttools.console import console
from nexttools.device import DEVICE_HELP
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


@cli.command("extrapolate", epilog=EPILOG)
@click.option(
    "--alpha", type=float, default=1.5, help="Extending coefficient α: Ŵ = W_c + α·T̂ (paper default)."
)
@click.option(
    "--method",
    type=click.Choice(list(METHODS)),
    default="next",
    help="How T̂ is predicted (listed below); only next needs `nexttools fit`.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(list(OUTPUTS)),
    default="merged",
    help="What is written (listed below); base resumes a LoRA run in place.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder.  [default: <workdir>/extrapolated-alpha{α}[-{method}][-{format}]]",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Output dtype.  [default: the base's]",
)
@click.option("--max-shard-size", default="5GB", help="Largest safetensors shard (5GB, 500MB, 2GiB...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing nexttools output at --out.")
@click.option(
    "--dry-run", is_flag=True, help="Print what would be written (files, shards, bytes, dtype) and exit."
)
@click.option("--base-model-id", default=None, help="Hub id of the base, for the model card's base_model.")
@workdir_options
@click.option("--device", default="auto", help=DEVICE_HELP)
@click.option("--push-to-hub", "push_to_hub", metavar="REPO_ID", default=None, help="Then push the output.")
@click.option("--private", is_flag=True, help="With --push-to-hub: create the repo private.")
@click.option(
    "--token",
    default=None,
    show_default=False,
    help="With --push-to-hub: Hub token.  [default: HF_TOKEN or the saved login]",
)
@click.option(
    "--endpoint", envvar="HF_ENDPOINT", default=None, show_envvar=True, help="With --push-to-hub: Hub URL."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def extrapolate_command(
    alpha: float,
    method: str,
    output_format: str,
    out: Path | None,
    dtype: str | None,
    max_shard_size: str,
    overwrite: bool,
    dry_run: bool,
    base_model_id: str | None,
    workdir: Path,
    store: Path | None,
    device: str,
    push_to_hub: str | None,
    private: bool,
    token: str | None,
    endpoint: str | None,
    as_json: bool,
) -> None:
    """Jump the run ahead: write the last checkpoint moved α·T̂ along its predicted trajectory.

    \b
    nexttools extrapolate --alpha 1.5                 # -> <workdir>/extrapolated-alpha1.5/ (merged)
    nexttools extrapolate --alpha 1.5 --format base   # resume your own LoRA checkpoint on it, in place
    nexttools extrapolate --method factor-linear --format checkpoint   # a resumable checkpoint-N copy
    """
    from nexttools.errors import UserError
    from nexttools.extrapolate import ExtrapolateOptions, extrapolate, parse_size

    options = ExtrapolateOptions(
        workdir=workdir,
        store=store,
        alpha=alpha,
        method=method,
        format=output_format,
        out=out,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        overwrite=overwrite,
        dry_run=dry_run,
        base_model_id=base_model_id,
        device=device,
    )
    summary = extrapolate(options)
    if dry_run:
        console.print(
            f"dry run: would write {summary.out} ({summary.format}, {summary.method}, α = {summary.alpha:g}, "
            f"k = {summary.k}, {summary.dtype}, {summary.shards} shard(s), "
            f"{summary.total_bytes / 1e6:.1f} MB)"
        )
        for name, size in summary.files.items():
            console.print(f"  {name}  {size / 1e6:.2f} MB")
    document = summary.document()
    if push_to_hub and not dry_run:
        from nexttools.hub import push

        try:
            pushed = push(summary.out, push_to_hub, private=private, token=token, endpoint=endpoint)
        except UserError as error:  # the model is written and whole: say how to retry the push alone
            raise UserError(
                f"{error} (the output is complete at {summary.out}; retry with `nexttools push`)"
            ) from error
        console.print(f"Pushed to {pushed.repo_url}: {pushed.commit_url}", soft_wrap=True)
        document["push"] = pushed.to_json()
    if as_json:
        click.echo(json.dumps(document, indent=2))
