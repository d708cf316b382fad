"""Small JSON files that trainers write beside their weights (configs, markers, metadata)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nexttools.errors import UserError


def read_json_object(path: Path, *, missing: str) -> dict[str, Any]:
    """The JSON object in ``path``; ``UserError`` (``missing`` when there is no file) otherwise."""
    if not path.is_file():
        raise UserError(missing)
    try:
        document = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(document, dict):
        raise UserError(f"{path}: not a JSON object")
    return document
