"""What every output format is: one interface from a jump to files on disk, and to its resume recipe.

An output format is a subclass of :class:`OutputFormat` in its own module, listed once in
:data:`nexttools.outputs.OUTPUTS`. ``extrapolate`` asks it to :meth:`~OutputFormat.check` the run
and method, to :meth:`~OutputFormat.plan` (every file and its size, before anything is written),
and then calls the plan's ``write`` inside a staging folder; the model card asks it how the output
is loaded and how training resumes from it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch

from nexttools.manifest import Manifest
from nexttools.methods import Jump, Method
from nexttools.ranks import Ranks
from nexttools.run import OpenedRun

Weights = Literal["model", "adapter"]


@dataclass(frozen=True)
class OutputRequest:
    """Everything an output needs: the run, the jump, and the writing options.

    ``dtype`` is ``--dtype`` (None keeps each tensor's own); ``max_shard_size`` is in bytes;
    ``base_id`` is the base's Hub id when known; ``device`` is where tensors are computed.
    """

    run: OpenedRun
    jump: Jump
    dtype: torch.dtype | None
    max_shard_size: int
    base_id: str | None
    device: torch.device


@dataclass
class OutputPlan:
    """What an output will write: ``files`` (name -> bytes, exact where known), shards, dtype.

    ``write(folder, ranks)`` writes every file but the model card and the manifest into ``folder``
    (under torchrun, each rank its share of the shards: :func:`~nexttools.outputs.model_folder.write_model`);
    ``adapter_rank`` is the rank an adapter output declares (the manifest records it).
    """

    files: dict[str, int]
    shards: int
    dtype: torch.dtype
    write: Callable[[Path, Ranks], None]
    untied: bool = False
    warnings: list[str] = field(default_factory=list)
    adapter_rank: int | None = None


class OutputFormat(ABC):
    """One ``--format``. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the ``--format`` value; ``suffix`` its part of the default folder name.
        summary: one sentence for ``--help`` and the docs.
        lora_only: refuse full-weight runs.
        resumes_in_place: the run itself goes on from this output (its own checkpoint and optimizer),
            so ``extrapolate --record`` may record the jump as part of the run.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    lora_only: ClassVar[bool] = False
    resumes_in_place: ClassVar[bool] = False

    @property
    def suffix(self) -> str:
        return f"-{self.name}"

    def check(self, run: OpenedRun, method: Method, dtype: torch.dtype | None) -> None:  # noqa: B027
        """Refuse, with one :class:`UserError` line, a run or method this output cannot write."""

    def weights(self, run_kind: str) -> Weights:
        """What the folder's weights are: a whole model, or a PEFT adapter (``verify_output`` checks it)."""
        return "model"

    @abstractmethod
    def plan(self, request: OutputRequest) -> OutputPlan:
        """Plan every file (sizes up front) without writing anything."""

    @abstractmethod
    def load_text(self, manifest: Manifest, target: str) -> str:
        """The model card's "How to load" section body (Markdown), for an output at ``target``."""

    @abstractmethod
    def resume_text(self, manifest: Manifest, target: str) -> str:
        """The model card's "Resume RL training" section body (Markdown): TRL, verl, OpenRLHF."""
