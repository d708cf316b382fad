"""Files and folders created beside a target, never through a link planted under their name.

A workdir or output folder may be shared, so anyone who can write there can plant a symlink, a hard
link or a folder under a name nexttools is about to create (a lock, a partial store, a staging
folder, a cache's temporary file). Every such name is created here, in the target's own folder:

- under a fresh random name (:func:`stage_file`, :func:`new_folder`: ``mkstemp``/``mkdtemp``, which
  create with ``O_EXCL``), so nothing planted can be met, then ``os.replace``d onto the target (a
  rename replaces a planted symlink itself, never the file it points to);
- or, where the name must be fixed (a lock, found by every writer), opened with ``O_NOFOLLOW`` and
  refused unless it is a plain file with one link (:func:`open_lock_file`).

Files and folders get the permissions a plain ``open``/``mkdir`` would give them under the
process's umask, not ``mkstemp``'s 0600 / ``mkdtemp``'s 0700.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path

from nexttools.errors import UserError


def _umask() -> int:
    """The process's umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def stage_file(target: Path, data: bytes) -> Path:
    """Write ``data`` to a new, randomly named hidden file beside ``target`` and return its path.

    The caller renames it onto ``target`` (``os.replace``) or removes it; a failure here removes it.
    """
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def write_atomic(target: Path, data: bytes) -> None:
    """Replace ``target`` with a file holding ``data``, whole or not at all (never through a link)."""
    staged = stage_file(target, data)
    try:
        os.replace(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def new_folder(parent: Path, prefix: str) -> Path:
    """A new, empty folder in ``parent`` named ``prefix`` + random characters, made by this process."""
    path = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(path, 0o777 & ~_umask())
    return path


def create_new_file(path: Path) -> int:
    """Create ``path`` (which must not exist, not even as a dangling link) and return a read-write fd."""
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)


def open_lock_file(path: Path) -> int:
    """Open (creating it if absent) the lock file ``path``; refuse anything but a plain, singly linked
    file, so that a planted symlink, hard link, folder or FIFO is never truncated or written through."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o666)
    except OSError as error:
        if error.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise UserError(
                f"{path} is not a lock file nexttools made (a link or a folder): remove it"
            ) from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise UserError(f"{path} is not a lock file nexttools made (a link or a special file): remove it")
    return fd


def same_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed) is the very file open as ``fd``."""
    with contextlib.suppress(OSError):
        here, there = os.lstat(path), os.fstat(fd)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
    return False
