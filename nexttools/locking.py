"""One writer at a time: an exclusive ``flock`` on a sidecar file, removed on release.

The kernel drops a ``flock`` when its process dies, so even ``kill -9`` leaves no stale lock; the
sidecar file itself is removed on release, and a process that opened it just before the removal
notices (different inode) and retries, so two writers can never each hold a lock on a different file.
The sidecar is opened without following links, and only a plain file with one link is locked
(:func:`nexttools.safe_files.open_lock_file`): a planted link never truncates another file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from nexttools.errors import UserError
from nexttools.safe_files import open_lock_file


@contextlib.contextmanager
def exclusive_lock(target: Path, guarded: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``target`` while the block runs, on behalf of ``guarded``.

    A second writer gets a ``UserError`` naming ``guarded`` and the holder's pid, at once (no wait).
    """
    while True:
        fd = open_lock_file(target)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise UserError(
                    f"{guarded} is being written by another nexttools process (pid {holder})"
                ) from None
            raise
        try:
            if os.stat(target).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file while we waited: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)
        os.close(fd)
