"""Cheap identity of a checkpoint's files, to notice a checkpoint that was rewritten since extraction.

Hashing whole weight files would cost as much as reading them; instead the fingerprint covers each
file's name, size and modification time (any rewrite changes the mtime) and, for safetensors, the
whole header (names, shapes, dtypes and offsets), which catches a same-size rewrite even where the
file system keeps coarse or copied mtimes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from nexttools.checkpoints.weights import read_safetensors_header
from nexttools.errors import UserError


def fingerprint(files: Sequence[Path]) -> str:
    """A 32-hex-digit digest of ``files`` (order matters): names, sizes, mtimes, safetensors headers.

    Only the file *name* enters, not its folder, so moving a run (which keeps mtimes) keeps its
    fingerprints. A missing file, or a corrupt safetensors header, raises ``UserError``.
    """
    digest = hashlib.sha256()
    for file in files:
        path = Path(file)
        try:
            stat = path.stat()
        except OSError as error:
            raise UserError(f"{path}: cannot read ({error.strerror or error})") from error
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if path.suffix == ".safetensors":
            digest.update(read_safetensors_header(path).raw)
    return digest.hexdigest()[:32]
