"""Several processes on one command, started by ``torchrun``: which modules each one owns, how their
results reach the one process that writes, and how they fail together.

``torchrun --standalone --nproc-per-node N --no-python nexttools extract RUN`` starts N copies of the
command with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address in their environment;
multi-node is plain torchrun (``--nnodes``, ``--rdzv-backend c10d --rdzv-endpoint HOST:PORT``). Each
command reads that environment through :func:`joined` and joins one ``torch.distributed`` group:
gloo on CPU, NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``). Without torchrun (no ``WORLD_SIZE``,
or 1) nothing is initialised and the command runs as one process.

Why modules round-robin (module ``j`` belongs to rank ``j mod N``): the modules come sorted by name,
so every rank gets the same mix of shapes, and rank 0, which also writes, is never more than one
module ahead or behind the others.

Failing together: a rank that hits an error must not leave the others blocked in a collective
forever. Every step that can fail runs inside :func:`together`, which ends with one collective where
each rank says whether it failed. If any did, the lowest failing rank raises its own error (the CLI
prints its one line) and every other rank raises :class:`~nexttools.errors.PeerFailed` (exit 2 without
a line), so the user reads the cause once. torchrun then reports the exit codes in its own words.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from nexttools.errors import PeerFailed, UserError
from nexttools.launch import launched

# A rank may wait this long for the others (a slow checkpoint read on another rank), not forever.
_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class Ranks:
    """This process's place among ``world`` processes; ``device`` is where it computes."""

    rank: int
    world: int
    device: torch.device

    @property
    def writer(self) -> bool:
        """Rank 0 writes the store, the index, the card and the manifest."""
        return self.rank == 0

    def owner(self, index: int) -> int:
        """The rank that computes item ``index`` (modules, shards): round-robin."""
        return index % self.world

    def mine(self, count: int) -> range:
        """The indices among ``count`` items that this rank computes."""
        return range(self.rank, count, self.world)

    @property
    def _wire(self) -> torch.device:
        """Where tensors must be to travel: NCCL moves CUDA tensors only, gloo CPU ones."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def settle(self, error: BaseException | None) -> None:
        """Collective: every rank says whether it failed; returns only if none did.

        The lowest failing rank re-raises ``error``; the others raise :class:`PeerFailed`.
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        flags = torch.zeros(self.world, dtype=torch.int32, device=self._wire)
        flags[self.rank] = 0 if error is None else 1
        dist.all_reduce(flags)
        failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
        if not failed:
            return
        if self.rank == failed[0]:
            assert error is not None
            raise error
        raise PeerFailed(f"rank {failed[0]} failed")

    def send(self, arrays: Sequence[np.ndarray], to: int) -> None:
        """Send ``arrays`` to rank ``to``, which receives them with :meth:`receive` (same shapes)."""
        for array in arrays:
            dist.send(torch.from_numpy(np.ascontiguousarray(array)).to(self._wire), dst=to)

    def receive(self, shapes: Sequence[tuple[tuple[int, ...], np.dtype]], source: int) -> list[np.ndarray]:
        """Receive one array per ``(shape, dtype)`` from rank ``source``, in the order it sent them."""
        received = []
        for shape, dtype in shapes:
            buffer = torch.from_numpy(np.empty(shape, dtype=dtype)).to(self._wire)
            dist.recv(buffer, src=source)
            received.append(buffer.cpu().numpy())
        return received

    def shared_text(self, text: str) -> str:
        """Collective: rank 0's ``text`` on every rank (the others pass anything, e.g. "")."""
        if self.world == 1:
            return text
        mine = list(text.encode()) if self.writer else []
        length = torch.tensor([len(mine)], dtype=torch.int64, device=self._wire)
        dist.broadcast(length, src=0)
        buffer = (
            torch.tensor(mine, dtype=torch.uint8)
            if self.writer
            else torch.zeros(int(length), dtype=torch.uint8)
        )
        buffer = buffer.to(self._wire)
        dist.broadcast(buffer, src=0)
        return bytes(buffer.cpu().tolist()).decode()


ALONE = Ranks(0, 1, torch.device("cpu"))
"""One process, not launched by torchrun: it owns everything."""


@contextmanager
def together(ranks: Ranks) -> Iterator[None]:
    """Run a step that can fail on some ranks only; afterwards all ranks have failed or none has."""
    try:
        yield
    except Exception as error:  # Ctrl-C and SIGTERM reach every rank from torchrun: not collective
        ranks.settle(error)
    ranks.settle(None)


@contextmanager
def joined(device: torch.device) -> Iterator[Ranks]:
    """This process's :class:`Ranks`, in a ``torch.distributed`` group for as long as the block runs.

    Under torchrun, a CUDA ``device`` without an index becomes ``cuda:LOCAL_RANK``.
    """
    rank, world, local = launched()
    if world == 1:
        yield Ranks(0, 1, device)
        return
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=_TIMEOUT)
    except (RuntimeError, ValueError) as error:  # no rendezvous, a port taken, NCCL missing...
        raise UserError(f"rank {rank} cannot join the torchrun group ({backend}): {error}") from None
    try:
        yield Ranks(rank, world, device)
    finally:
        dist.destroy_process_group()
