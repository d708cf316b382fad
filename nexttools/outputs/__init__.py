"""The output formats: one module each, registered here once (see ``docs/extending.md``)."""

from __future__ import annotations

from nexttools.errors import UserError
from nexttools.outputs.adapter import Adapter
from nexttools.outputs.base import OutputFormat, OutputPlan, OutputRequest
from nexttools.outputs.checkpoint import TrainerCheckpoint
from nexttools.outputs.merged import Merged
from nexttools.outputs.new_base import NewBase

OUTPUTS: dict[str, OutputFormat] = {
    output.name: output for output in (Merged(), Adapter(), NewBase(), TrainerCheckpoint())
}
"""Every ``--format``, in the order the CLI and the docs list them."""


def get_output(name: str) -> OutputFormat:
    """The registered output format called ``name``; ``UserError`` listing the choices otherwise."""
    if name not in OUTPUTS:
        raise UserError(f"unknown --format {name!r} (choose from {', '.join(OUTPUTS)})")
    return OUTPUTS[name]


__all__ = ["OUTPUTS", "OutputFormat", "OutputPlan", "OutputRequest", "get_output"]
