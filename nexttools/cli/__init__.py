"""The ``nexttools`` command: a thin click shell over the typed core.

Each subcommand lives in its own module of this package (:data:`COMMANDS`) and only parses options,
calls one core function and prints its summary. The group imports a subcommand's module only when
that command runs or shows its help, so ``nexttools --help``, ``--version`` and an unknown command
answer before torch is imported. :func:`main` ends every way a run can fail in one line on stderr:

- a :class:`~nexttools.errors.UserError`, a usage mistake, or a file-system refusal (full disk,
  read-only location, a path below a regular file...): exit code 2 (under torchrun, the ranks that
  did not fail first exit 2 silently: :mod:`nexttools.ranks`);
- Ctrl-C (SIGINT): exit 130; SIGTERM (``timeout``, Slurm, ``docker stop``): exit 143.

Interruptions are raised as exceptions, so every staging folder, partial store and lock is removed
by the code that made it on the way out, exactly as for an error.
"""

from __future__ import annotations

import errno
import importlib
import signal
import sys
from types import FrameType

import click
from rich.markup import escape

from nexttools import __version__
from nexttools.console import console
from nexttools.errors import PeerFailed, UserError
from nexttools.launch import launched_rank

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}

COMMANDS: dict[str, tuple[str, str]] = {
    "extract": ("extract_command", "checkpoints -> trajectory store (incremental)"),
    "fit": ("fit_command", "store -> predictor, and every method back-tested"),
    "backtest": ("backtest_command", "what a jump is worth, scored by your own eval"),
    "inspect": ("inspect_command", "rank-1 energy, linearity and consistency of the run"),
    "extrapolate": ("extrapolate_command", "the jump, written to resume in place"),
    "push": ("push_command", "an output folder -> the Hugging Face Hub"),
}
"""Every subcommand: its name, the function in ``nexttools.cli.<name>``, and its one-line summary."""


class LazyGroup(click.Group):
    """A group that imports each subcommand's module on first use (module docstring)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module = importlib.import_module(f"nexttools.cli.{cmd_name}")
        command = getattr(module, COMMANDS[cmd_name][0])
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, summary) for name, (_, summary) in COMMANDS.items()])


@click.group(cls=LazyGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="nexttools")
def cli() -> None:
    """Skip part of an RL run: extract its rank-1 trajectory, judge a jump, make it, resume in place.

    \b
    nexttools extract RUN [--base BASE] && nexttools fit && nexttools backtest --eval-cmd CMD
    nexttools extrapolate            # follows backtest's verdict; `<command> --help` for options
    """


# File-system refusals that are the user's environment, not a bug.
_ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
        errno.ENOENT,
    }
)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the clean-up of every ``with`` block runs."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _fail(message: str, code: int) -> None:
    # The message is the user's own text (paths, commands): never read as rich markup. A quiet
    # torchrun rank that failed first still says why.
    console.quiet = False
    console.print(f"[red]error:[/red] {escape(message)}", markup=True, soft_wrap=True, highlight=False)
    sys.exit(code)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    interrupted = "any partial output, store or lock was removed; re-run the command to finish"
    try:
        console.quiet = launched_rank() != 0
        cli.main(standalone_mode=False)
    except UserError as error:
        _fail(str(error), 2)
    except PeerFailed:
        sys.exit(2)  # a torchrun peer failed and printed the cause: one line is enough
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx is not None else ""
        _fail(f"{error.format_message()}{hint}", 2)
    except click.ClickException as error:
        _fail(error.format_message(), error.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        _fail(f"interrupted (Ctrl-C): {interrupted}", 130)
    except Terminated:
        _fail(f"terminated (SIGTERM): {interrupted}", 143)
    except OSError as error:
        if error.errno not in _ENVIRONMENT_ERRNOS:
            raise
        where = f" {error.filename}" if error.filename else ""
        _fail(f"cannot use{where}: {error.strerror or error}", 2)


def on_rank_zero() -> bool:
    """Whether this process prints the summary (always, unless it is a torchrun rank > 0)."""
    return launched_rank() == 0
