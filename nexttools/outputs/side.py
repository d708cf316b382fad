"""Files an output copies beside its weights, and the byte counts that plan them."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path

from nexttools.outputs.model_folder import CONFIG_NAME, ModelPlan
from nexttools.writer import ShardedWriter


def sizes_of(files: Mapping[str, Path]) -> dict[str, int]:
    """Output name -> size in bytes of each source file."""
    return {name: path.stat().st_size for name, path in files.items()}


def copy_files(files: Mapping[str, Path], folder: Path) -> None:
    """Copy each source to ``folder/<name>`` (sub-folders created as needed)."""
    for name, source in files.items():
        destination = folder / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, destination)


def writer_file_sizes(plan: ModelPlan, max_shard_size: int) -> dict[str, int]:
    """The exact size of every shard, the index and ``config.json`` of ``plan``, before writing."""
    planner = ShardedWriter(Path("."), max_shard_size, plan.specs)  # plans only: writes nothing
    try:
        sizes = planner.file_sizes()
    finally:
        planner.close()
    return sizes | {CONFIG_NAME: len(plan.config_text.encode())}
