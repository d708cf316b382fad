"""The one exception type a user can cause.

Core code raises :class:`UserError` for every mistake a user can make (a wrong path, an
unsupported adapter, a corrupt file, an existing output...). The CLI turns it into one line on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's inputs or environment, reported as one line, exit code 2."""


class PeerFailed(Exception):
    """Another rank of a ``torchrun`` job failed and printed why; this one exits 2 without a line."""
