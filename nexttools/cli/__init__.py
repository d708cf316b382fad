"""The ``nexttools`` command: a thin click shell over the typed core.

Each subcommand lives in its own module of this package and only parses options, calls one core
function and prints its summary. :func:`main` turns a :class:`~nexttools.errors.UserError` into
one line on stderr and exit code 2.
"""

from __future__ import annotations

import sys

import click

from nexttools import __version__
from nexttools.console import console
from nexttools.errors import UserError

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="nexttools")
def cli() -> None:
    """Extrapolate an RL run along its rank-1 weight trajectory (NExt).

    \b
    nexttools extract RUN [--base BASE]   checkpoints -> trajectory store
    nexttools fit                         store -> predictor + back-test
    nexttools extrapolate --alpha 1.5     predictor + last checkpoint -> HF model
    nexttools push OUT REPO_ID            output folder -> Hugging Face Hub
    """


def main() -> None:
    """Console-script entry point."""
    try:
        cli.main(standalone_mode=False)
    except UserError as error:
        console.print(f"[red]error:[/red] {error}", markup=True, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        console.print("[red]aborted[/red]", markup=True)
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)


# Subcommands register themselves on `cli`; imported last so that they can import it.
from nexttools.cli import extract, extrapolate, fit, push  # noqa: E402, F401
