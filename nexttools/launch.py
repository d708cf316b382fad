"""Whether this process was started by ``torchrun``, and as which rank: read from the environment
alone, so that the CLI can ask before it imports torch."""

from __future__ import annotations

import os

from nexttools.errors import UserError


def launched() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when not launched by it."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (set by torchrun)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK={rank} is not within WORLD_SIZE={world}")
    return rank, world, local


def launched_rank() -> int:
    """This process's rank under torchrun (0 when alone): the CLI quiets every other rank's console,
    so that the user sees one progress bar and one summary."""
    return launched()[0]
