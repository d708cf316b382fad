"""Access tokens kept out of what nexttools records (the command line in a manifest and a model card)."""

from __future__ import annotations

import re

_TOKEN_PATTERNS = (re.compile(r"(--token[= ])\S+"), re.compile(r"\bhf_[A-Za-z0-9]{8,}\b"))


def scrub_secrets(text: str) -> str:
    """Replace anything that looks like an access token in ``text`` (e.g. a recorded command) by ``***``."""
    text = _TOKEN_PATTERNS[0].sub(r"\1***", text)
    return _TOKEN_PATTERNS[1].sub("***", text)
