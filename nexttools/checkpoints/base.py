"""Resolve the run's base model (``--base``, or ``base_model_name_or_path``): a local folder or a Hub id.

A Hub id is resolved through the huggingface_hub cache with ``snapshot_download``, which returns
the cached snapshot without a download when it is complete and works offline when it is cached.
Only weights, configs and tokenizer files are fetched: never optimizer states, ``.bin`` duplicates
of the safetensors weights, or other large extras.
"""

from __future__ import annotations

from pathlib import Path

from nexttools.checkpoints.weights import has_model_weights
from nexttools.errors import UserError

# What a base needs: safetensors weights (+ index), config/generation config, tokenizer, chat template.
HUB_PATTERNS = [
    "*.safetensors",
    "*.json",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
    "*.jinja",
]


def resolve_base(spec: str) -> Path:
    """The local folder of the base model named by ``spec``.

    ``spec`` is a local folder (returned as is, resolved) or a Hub repo id such as
    ``Qwen/Qwen2.5-1.5B-Instruct``. Something that looks like a path (``/``, ``.``, ``~``, more than
    one ``/``) but does not exist is reported as a missing folder, never sent to the Hub. A Hub id
    that cannot be resolved (offline and not cached, no network, unknown or gated repo) raises
    ``UserError`` telling the user to pass a local path with ``--base``.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise UserError(f"--base {spec}: not a folder (pass the base model's folder)")
    if _looks_like_path(spec):
        raise UserError(f"--base {spec}: no such folder")
    return _from_hub(spec)


def recorded_base(spec: str) -> str:
    """What a store records for ``spec``: a local folder as its absolute path (so that the store works
    from any directory), a Hub id as typed."""
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.is_dir() else spec


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or "\\" in spec or spec.count("/") > 1


def _from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    hint = f"no local folder {repo_id} exists under {Path.cwd()} either; pass the base's folder with --base"
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except HFValidationError as error:
        raise UserError(
            f"--base {repo_id}: neither a local folder nor a valid Hub repo id; {hint}"
        ) from error
    except OSError as error:  # hub errors all are: offline, no network, not found, gated, incomplete cache
        raise UserError(
            f"--base {repo_id}: not a Hub id in the huggingface_hub cache, and the Hub cannot be reached "
            f"or does not have it ({type(error).__name__}); {hint}"
        ) from error
    if not has_model_weights(folder):
        raise UserError(f"--base {repo_id}: the Hub snapshot {folder} has no safetensors weights; {hint}")
    return folder
