"""Stream tensors into Hugging Face safetensors shards, inside an output folder staged for atomic commit.

Two parts, one job (getting a model folder onto disk without ever holding the model or leaving a
half-written folder that looks whole):

- :class:`ShardedWriter` writes ``model-0000k-of-0000N.safetensors`` (or one ``model.safetensors``)
  with ``{"format": "pt"}`` metadata and, for several shards, ``model.safetensors.index.json``
  (``metadata.total_size`` in bytes, ``indent=2``, sorted keys, trailing newline), as transformers
  does. Every tensor's size is known before any is computed (from the input headers), so the shard
  plan is made up front: names are final when written, and each shard's header is written first and
  its tensors appended one at a time. Peak memory is therefore two tensors (one being written while the
  next is computed), not one shard.
- :func:`staged_folder` builds the whole output in a hidden sibling folder and renames it into place
  only when it is complete; any failure (a disk that fills up included) removes it.

Why not ``safetensors.torch.save_file`` per shard: it needs the whole shard in memory at once.
The file layout written here is the same (8-byte little-endian header length, JSON header padded
with spaces to a multiple of 8, tensors back to back, larger element sizes first so that every
tensor is aligned).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import struct
import sys
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from nexttools.disk import free_bytes, human_bytes, require_free
from nexttools.errors import UserError
from nexttools.locking import exclusive_lock
from nexttools.manifest import MANIFEST_NAME
from nexttools.ranks import ALONE, Ranks
from nexttools.safe_files import new_folder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class TensorSpec:
    """One output tensor as the shard plan sees it: its name, shape and dtype (hence its byte size)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file: its final name and its tensors in on-disk order."""

    file: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the header adds a few KiB)."""
        return sum(spec.nbytes for spec in self.tensors)


def plan_shards(specs: Sequence[TensorSpec], max_shard_size_bytes: int) -> list[Shard]:
    """Split ``specs`` into shards of at most ``max_shard_size_bytes`` of data, as transformers does.

    The grouping is ``huggingface_hub.split_torch_state_dict_into_shards``'s, planned from meta
    tensors (no memory): tensors fill a shard in order until the next one would overflow it, and a
    tensor larger than the limit gets a shard of its own while the open shard goes on filling. Within
    a shard, tensors are ordered by element size, largest first (stable), so every tensor is aligned.
    """
    if max_shard_size_bytes <= 0:
        raise UserError(f"--max-shard-size must be positive, got {max_shard_size_bytes} bytes")
    by_name = {spec.name: spec for spec in specs}
    if len(by_name) != len(specs):
        raise ValueError("tensor names must be unique")
    meta = {spec.name: torch.empty(spec.shape, dtype=spec.dtype, device="meta") for spec in specs}
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size_bytes)
    return [
        Shard(file, tuple(sorted((by_name[name] for name in names), key=lambda s: -s.dtype.itemsize)))
        for file, names in split.filename_to_tensors.items()
    ]


def _header(shard: Shard) -> bytes:
    """The 8-byte length plus the space-padded JSON header of ``shard``."""
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard.tensors:
        if spec.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be written to safetensors")
        entries[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class ShardedWriter:
    """Streams the tensors of a planned model into safetensors shards under ``out_dir``.

    Add the tensors one at a time in the order of :attr:`names` (the plan's on-disk order); each
    must match its spec's shape and dtype. A shard file is opened with its full header when its
    first tensor arrives and closed after its last one; :meth:`finish` checks that none is missing,
    and :meth:`write_index` then writes the index (when there are several shards). Writing overlaps
    the caller's computation of the next tensor (one background thread, one write in flight). Use it
    as a context manager (or call :meth:`close`), inside :func:`staged_folder` so that a failure
    leaves nothing.

    Args:
        out_dir: existing folder to write into.
        max_shard_size_bytes: maximum tensor bytes per shard (a larger tensor gets its own shard).
        specs: every output tensor, in the order the caller produces them.
        ranks: under torchrun, this writer writes only the shards its rank owns (shard ``s`` is rank
            ``s mod N``'s), and :attr:`names` lists only their tensors; the plan is every rank's.
    """

    def __init__(
        self,
        out_dir: Path,
        max_shard_size_bytes: int,
        specs: Sequence[TensorSpec],
        ranks: Ranks = ALONE,
    ) -> None:
        if sys.byteorder != "little":
            raise UserError("safetensors files are little-endian; this machine is big-endian")
        self.out_dir = Path(out_dir)
        self.shards = plan_shards(specs, max_shard_size_bytes)
        self.total_size: int = sum(shard.nbytes for shard in self.shards)
        self._queue = [
            (shard_index, spec)
            for shard_index, shard in enumerate(self.shards)
            if ranks.owner(shard_index) == ranks.rank
            for spec in shard.tensors
        ]
        self.names: list[str] = [spec.name for _, spec in self._queue]
        self._next = 0
        self._file: BinaryIO | None = None  # the shard being written, owned by the writer thread
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nexttools-writer")
        self._pending: Future[None] | None = None

    @property
    def files(self) -> list[str]:
        """Every file the writer produces, shards first, then the index when there is one."""
        shards = [shard.file for shard in self.shards]
        return shards if len(shards) == 1 else [*shards, INDEX_FILE]

    def file_sizes(self) -> dict[str, int]:
        """The exact size in bytes of every file in :attr:`files`, known before anything is written."""
        sizes = {shard.file: len(_header(shard)) + shard.nbytes for shard in self.shards}
        index = self._index_text()
        if index is not None:
            sizes[INDEX_FILE] = len(index.encode())
        return sizes

    def _index_text(self) -> str | None:
        if len(self.shards) == 1:
            return None
        index = {
            "metadata": {"total_size": self.total_size},
            "weight_map": {spec.name: shard.file for shard in self.shards for spec in shard.tensors},
        }
        return json.dumps(index, indent=2, sort_keys=True) + "\n"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue ``tensor`` (any device; copied to CPU if needed) as the next tensor of the plan.

        The bytes are written by a background thread while the caller computes the next tensor;
        at most one write is in flight, so memory holds at most two tensors. A write error (a full
        disk) is raised by the next :meth:`add` or by :meth:`finish`.
        """
        shard, spec = self._next_spec(name)
        if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"{name}: planned {spec.dtype} {list(spec.shape)}, got {tensor.dtype} {list(tensor.shape)}"
            )
        self._next += 1
        self._submit(shard, spec, tensor.detach().to("cpu").contiguous().reshape(-1), last=True)

    def add_pieces(self, name: str, pieces: Iterable[torch.Tensor]) -> None:
        """Queue the next tensor of the plan as consecutive flat pieces of its dtype, in order.

        A copy through pieces never holds the whole tensor (an 8B model's 1 GB embedding streams
        through in blocks): one piece is written while the next is read.
        """
        shard, spec = self._next_spec(name)
        self._next += 1  # a piece refused below leaves a partial shard: the staged output is discarded
        count = math.prod(spec.shape)
        written, pending = 0, None
        for piece in pieces:
            if piece.dtype != spec.dtype:
                raise ValueError(f"{name}: planned {spec.dtype}, got a {piece.dtype} piece")
            if pending is not None:
                self._submit(shard, spec, pending, last=False)
            pending = piece.detach().to("cpu").contiguous().reshape(-1)
            written += pending.numel()
        if pending is None or written != count:
            raise ValueError(f"{name}: planned {count} elements, got {written} in pieces")
        self._submit(shard, spec, pending, last=True)

    def _next_spec(self, name: str) -> tuple[Shard, TensorSpec]:
        if self._next >= len(self._queue):
            raise ValueError(f"{name}: every planned tensor has already been written")
        shard_index, spec = self._queue[self._next]
        if name != spec.name:
            raise ValueError(f"expected tensor {spec.name!r} next, got {name!r}")
        return self.shards[shard_index], spec

    def _submit(self, shard: Shard, spec: TensorSpec, data: torch.Tensor, *, last: bool) -> None:
        """Hand ``data`` (flat, CPU) to the writer thread once the write in flight is done."""
        self._wait()
        self._pending = self._pool.submit(self._write, shard, spec, data, last)

    def _write(self, shard: Shard, spec: TensorSpec, data: torch.Tensor, last: bool) -> None:
        """Append ``data`` to ``shard``'s file (in the writer thread): header first; the file is closed
        after the ``last`` piece of the shard's last tensor."""
        if self._file is None:
            self._file = open(self.out_dir / shard.file, "wb")  # noqa: SIM115 - spans several calls
            self._file.write(_header(shard))
        if data.numel():
            self._file.write(data.view(torch.uint8).numpy().data)
        if last and spec is shard.tensors[-1]:
            self._close_file()

    def _wait(self) -> None:
        """Wait for the write in flight, re-raising its error here, in the caller's thread."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def finish(self) -> None:
        """Wait for the last write and check that every tensor of :attr:`names` was written."""
        self._wait()
        if self._next != len(self._queue):
            missing = self._queue[self._next][1].name
            raise ValueError(
                f"{len(self._queue) - self._next} planned tensors not written, first {missing!r}"
            )

    def write_index(self) -> None:
        """Write ``model.safetensors.index.json`` (nothing for one shard): last, once every shard is."""
        index = self._index_text()
        if index is not None:
            (self.out_dir / INDEX_FILE).write_text(index)

    def close(self) -> None:
        """Stop the writer thread and close any open file (always call it; ``finish`` does not)."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)
            self._close_file()

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            file.close()


def _partial_prefix(out: Path) -> str:
    """Staging folders of ``out`` are ``.<name>.partial-<pid>-<random>`` beside it."""
    return f".{out.name}.partial-{os.getpid()}-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(out: Path) -> None:
    """Remove hidden ``.<name>.partial-<pid>[-…]`` sibling folders left by killed runs (their process is
    gone); links are left alone."""
    for candidate in out.parent.glob(f".{out.name}.partial-*"):
        pid = candidate.name.removeprefix(f".{out.name}.partial-").split("-")[0]
        if pid.isdigit() and not candidate.is_symlink() and not _process_alive(int(pid)):
            shutil.rmtree(candidate, ignore_errors=True)


def check_destination(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that exists unless ``overwrite``; never overwrite what nexttools did not write.

    An existing empty folder is fine. With ``overwrite``, only a previous nexttools output (it holds
    ``nexttools.json``) may be replaced, so that a typo such as ``--out ~`` cannot destroy a folder.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise UserError(f"output folder {out} already exists; pass --overwrite to replace it")
    if not (out / MANIFEST_NAME).is_file():
        raise UserError(f"refusing to overwrite {out}: it is not a nexttools output (no {MANIFEST_NAME})")


@contextlib.contextmanager
def staged_folder(out: Path, *, overwrite: bool, needed_bytes: int) -> Iterator[Path]:
    """Yield a hidden sibling folder to write the output into; rename it to ``out`` when the block ends.

    The rename happens only if the block completes, so ``out`` is either absent, the previous output
    (until the final swap) or the new complete one. One writer per ``out`` at a time: a second one
    is refused at once (a lock on ``.<name>.lock`` beside it, removed on release). On any exception
    (Ctrl-C and SIGTERM included) the staging folder is removed; running out of disk space becomes a
    :class:`UserError` that says how many bytes were needed and how many are free. ``kill -9`` leaves
    the hidden folder behind, which the next run into the same ``out`` removes.

    Args:
        out: the final output folder.
        overwrite: replace an existing nexttools output at ``out``.
        needed_bytes: expected size of the output, checked against the free space before writing.
    """
    out = Path(out).absolute()
    check_destination(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(out.parent / f".{out.name}.lock", out):
        check_destination(out, overwrite=overwrite)  # again: another writer may have finished meanwhile
        _remove_stale_partials(out)
        require_free(out.parent, needed_bytes, str(out))
        staging = new_folder(out.parent, _partial_prefix(out))
        try:
            yield staging
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise UserError(
                    f"disk full while writing {out}: it needs {human_bytes(needed_bytes)}, "
                    f"{human_bytes(free_bytes(out.parent))} free (partial output removed)"
                ) from None
            raise
        _commit(staging, out)


def _commit(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``, replacing a previous output (already vetted by check_destination)."""
    if out.exists():
        previous = new_folder(out.parent, f".{out.name}.replaced-")  # empty: the rename replaces it
        os.replace(out, previous)
        os.replace(staging, out)
        shutil.rmtree(previous, ignore_errors=True)
    else:
        os.replace(staging, out)
