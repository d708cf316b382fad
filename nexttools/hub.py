"""Push a nexttools output folder to the Hugging Face Hub.

Everything that can be checked locally is checked before the first network call: the folder is a
complete, unmodified nexttools output (``manifest.verify_output``), no file exceeds the Hub's
per-file limit, a token is available, and the token does not appear in any text file about to be
published. Then ``HfApi(endpoint=..., token=...)`` (the endpoint passed explicitly, because
huggingface_hub reads ``HF_ENDPOINT`` only at import time and some of its code paths fall back to
the default Hub otherwise), ``create_repo(exist_ok=True)``, the target branch when it is missing, and
one ``upload_folder``. huggingface_hub shows the byte-level progress itself; with ``hf_xet``
installed it uploads in resumable batches, so re-running an interrupted push sends only what is
missing.

Every failure a user can cause or fix is turned into a one-line :class:`UserError`; the token never
appears in a message.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, constants, get_token
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from nexttools.card import CARD_NAME, render_model_card
from nexttools.console import console
from nexttools.errors import UserError
from nexttools.manifest import MANIFEST_NAME, Manifest, verify_output
from nexttools.options import CheckedOptions, argument, option
from nexttools.safe_files import new_folder

MAX_FILE_BYTES = 50 * 10**9
"""The Hub's hard limit per file (50 GB, decimal as the Hub states it); it answers 413 above it."""
_SCAN_LIMIT_BYTES = 16 * 2**20  # text files up to this size are searched for the token before upload
_SKIP_SCAN_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".gguf")
DEFAULT_BRANCH = constants.DEFAULT_REVISION


@dataclass(frozen=True)
class PushResult:
    """What a push did. ``revision`` is the branch committed to (the PR's base when ``pr_url`` is set)."""

    repo_id: str
    repo_url: str
    endpoint: str
    revision: str
    commit_url: str
    commit_oid: str
    pr_url: str | None
    files: tuple[str, ...]
    total_bytes: int
    card_uploaded: bool

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable summary (for ``--json``); holds no secret."""
        summary = asdict(self)
        summary["files"] = list(self.files)
        return summary


@dataclass(frozen=True)
class PushOptions(CheckedOptions):
    """Inputs of :func:`push`; each field is also its command-line option (:mod:`nexttools.options`).

    An existing public repo is refused under ``private`` rather than silently published to (the Hub
    ignores the visibility of an existing repo); without it a new repo follows its namespace's
    default. ``revision`` is created from the default branch when missing.
    """

    folder: Path = argument("A complete, unmodified output folder of `nexttools extrapolate`.", kind="dir")
    repo_id: str = argument("The model repo, owner/name.")
    private: bool = option(
        False, "Create the repo private (a new repo otherwise follows its owner's default)."
    )
    revision: str | None = option(
        None, "Branch to commit to; created from main when missing.  [default: main]"
    )
    create_pr: bool = option(False, "Open a pull request against main instead of committing to it.")
    commit_message: str | None = option(None, "Commit title.  [default: method, α, k and step]")
    token: str | None = option(None, "Hub access token.  [default: HF_TOKEN or the saved `hf auth login`]")
    endpoint: str | None = option(None, "Hub URL.  [default: https://huggingface.co]", envvar="HF_ENDPOINT")
    overwrite_card: bool = option(False, "Replace a README.md that the repo already has.")


def push(options: PushOptions) -> PushResult:
    """Upload the nexttools output ``options.folder`` to the model repo ``options.repo_id``.

    Returns: a :class:`PushResult` with the commit URL.
    Raises: :class:`UserError` (one line) for every failure a user can cause or fix.
    """
    folder, repo_id, token = Path(options.folder), options.repo_id, options.token
    revision, create_pr = options.revision, options.create_pr
    _check_repo_id(repo_id)
    if create_pr and revision not in (None, DEFAULT_BRANCH):
        raise UserError(
            f"--create-pr opens a pull request against {DEFAULT_BRANCH}; "
            f"it cannot target --revision {revision}"
        )
    manifest = verify_output(folder)
    token = token or get_token()
    if not token:
        raise UserError(
            "not logged in to the Hugging Face Hub: run `hf auth login`, set HF_TOKEN or use --token"
        )
    with _upload_view(folder, manifest, repo_id) as view:
        return _push_view(
            view,
            manifest,
            repo_id,
            token=token,
            endpoint=options.endpoint,
            private=options.private,
            revision=revision,
            create_pr=create_pr,
            commit_message=options.commit_message,
            overwrite_card=options.overwrite_card,
        )


@contextmanager
def _upload_view(folder: Path, manifest: Manifest, repo_id: str) -> Iterator[Path]:
    """A hidden sibling of ``folder`` holding exactly what is published: every file the manifest lists
    (hard links, so nothing is copied), the manifest, and the card rendered for ``repo_id``.

    The output folder itself is never changed, and a file the manifest does not list is refused
    rather than uploaded. The view is removed when the block ends, whatever happens.
    """
    listed = set(manifest.files) | {MANIFEST_NAME}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise UserError(f"{path} is a link: an output folder holds only the files nexttools wrote")
        if path.is_file() and name not in listed and name != CARD_NAME:
            raise UserError(
                f"{path} is not part of the output (nexttools.json does not list it): remove it, "
                "or write the output again"
            )
    view = new_folder(folder.parent, f".{folder.name}.push-")  # never a folder planted under a fixed name
    try:
        for name in sorted(listed):
            target = view / name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(folder / name, target)
            except OSError:  # another file system, or no hard links: copy
                shutil.copyfile(folder / name, target)
        (view / CARD_NAME).write_text(render_model_card(folder, manifest, repo_id=repo_id), encoding="utf-8")
        yield view
    finally:
        shutil.rmtree(view, ignore_errors=True)


@contextmanager
def _commit_urls_read_against(endpoint: str) -> Iterator[None]:
    """Make huggingface_hub read the commit URL it gets back against ``endpoint``.

    Before 1.0 ``CommitInfo`` parses it against the global ``constants.ENDPOINT``, not the
    ``HfApi``'s own endpoint, so a push to any other endpoint (``--endpoint``) uploaded everything and
    then failed with a ValueError. Only the upload call is wrapped (other calls build their URLs from
    templates fixed at import, which the change would break); the global is restored afterwards.
    """
    previous = constants.ENDPOINT
    constants.ENDPOINT = endpoint
    try:
        yield
    finally:
        constants.ENDPOINT = previous


def _push_view(
    folder: Path,
    manifest: Manifest,
    repo_id: str,
    *,
    token: str,
    endpoint: str | None,
    private: bool,
    revision: str | None,
    create_pr: bool,
    commit_message: str | None,
    overwrite_card: bool,
) -> PushResult:
    """Upload the prepared view ``folder`` (see :func:`push`)."""
    sizes = _upload_sizes(folder)
    _check_token_not_in_files(folder, sizes, token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    branch = revision or DEFAULT_BRANCH

    api = HfApi(endpoint=endpoint, token=token)
    state = _Progress()
    with _hub_errors(repo_id=repo_id, branch=branch, endpoint=endpoint, token=token, state=state):
        visibility = True if private else None  # None: a new repo follows its namespace's default
        repo_url = api.create_repo(repo_id, repo_type="model", private=visibility, exist_ok=True)
        state.connected = True
        if private and not api.repo_info(repo_id, repo_type="model").private:
            raise UserError(
                f"{repo_id} already exists and is public; --private does not change an existing repo "
                "(make it private on the Hub first, or drop --private)"
            )
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, repo_type="model", exist_ok=True)
        keep_card = not overwrite_card and api.file_exists(repo_id, CARD_NAME, revision=branch)
        uploaded = [name for name in sizes if not (keep_card and name == CARD_NAME)]
        total_bytes = sum(sizes[name] for name in uploaded)
        where = f"a pull request on {repo_id}" if create_pr else f"{repo_id}@{branch}"
        console.print(
            f"Uploading {len(uploaded)} files ({_human_bytes(total_bytes)}) to {where} at {endpoint}"
            + (" (keeping the repo's README.md; --overwrite-card replaces it)" if keep_card else ""),
            soft_wrap=True,  # a URL must stay on one line to be copied
        )
        with _commit_urls_read_against(endpoint):
            info = api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                repo_type="model",
                revision=None if create_pr else branch,
                create_pr=create_pr,
                commit_message=commit_message or _default_message(manifest),
                ignore_patterns=[CARD_NAME] if keep_card else None,
            )
    return PushResult(
        repo_id=repo_id,
        repo_url=str(repo_url),
        endpoint=endpoint,
        revision=branch,
        commit_url=info.commit_url,
        commit_oid=info.oid,
        pr_url=info.pr_url,
        files=tuple(uploaded),
        total_bytes=total_bytes,
        card_uploaded=not keep_card,
    )


def _check_repo_id(repo_id: str) -> None:
    """``owner/name`` with the Hub's allowed characters; checked locally so a typo costs no round trip."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise UserError(f"invalid repo id {repo_id!r}: {str(error).splitlines()[0]}") from None
    if repo_id.count("/") != 1:
        raise UserError(f"invalid repo id {repo_id!r}: expected owner/name, e.g. my-org/qwen-1.5b-grpo-next")


def _upload_sizes(folder: Path) -> dict[str, int]:
    """Size of every file ``upload_folder`` will send (POSIX path -> bytes); refuses one over the limit.

    Uses huggingface_hub's own default ignore patterns (``.git``...), so the list is what it uploads.
    """
    all_files = {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}
    names = sorted(filter_repo_objects(all_files, ignore_patterns=DEFAULT_IGNORE_PATTERNS))
    sizes = {name: all_files[name].stat().st_size for name in names}
    for name, size in sizes.items():
        if size > MAX_FILE_BYTES:
            raise UserError(
                f"{folder / name} is {_human_bytes(size)}, over the Hub's {_human_bytes(MAX_FILE_BYTES)} "
                "per-file limit: write the output again with a lower --max-shard-size"
            )
    return sizes


def _check_token_not_in_files(folder: Path, sizes: dict[str, int], token: str) -> None:
    """Refuse to publish a text file (manifest, card, config...) that contains the token."""
    needle = token.encode()
    for name, size in sizes.items():
        if size > _SCAN_LIMIT_BYTES or name.endswith(_SKIP_SCAN_SUFFIXES):
            continue
        if needle in (folder / name).read_bytes():
            raise UserError(f"{folder / name} contains your Hub token; remove it before pushing")


@dataclass
class _Progress:
    """How far the push got, to tell an unreachable endpoint from an interrupted upload."""

    connected: bool = False


@contextmanager
def _hub_errors(*, repo_id: str, branch: str, endpoint: str, token: str, state: _Progress) -> Iterator[None]:
    """Turn huggingface_hub and transport errors into one-line :class:`UserError`s without the token."""
    try:
        yield
    except UserError:
        raise
    except Exception as error:
        message = _explain(
            error, repo_id=repo_id, branch=branch, endpoint=endpoint, connected=state.connected
        )
        if message is None:
            raise
        raise UserError(message.replace(token, "***")) from None


def _explain(
    error: BaseException, *, repo_id: str, branch: str, endpoint: str, connected: bool
) -> str | None:
    """The one-line message for ``error`` (or for the Hub/transport error it wraps); None: a bug."""
    resume = "re-run the same command to resume (files already uploaded are not sent again)"
    for cause in _chain(error):
        if isinstance(cause, OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
        if isinstance(cause, HfHubHTTPError) and cause.response is not None:
            status = cause.response.status_code
            detail = _server_detail(cause)
            if status == 401:
                return (
                    f"the Hub at {endpoint} rejected the token (401{detail}); "
                    "log in with `hf auth login`, set HF_TOKEN or pass --token"
                )
            if status == 403:
                return f"no write access to {repo_id} (403{detail}); use a token with write permission there"
            if isinstance(cause, RevisionNotFoundError):
                return f"revision {branch!r} not found in {repo_id}"
            if isinstance(cause, RepositoryNotFoundError) or status == 404:
                return f"repository {repo_id} not found at {endpoint}"
            if status == 413:
                return f"the Hub refused a file as too large (413{detail}); lower --max-shard-size"
            if status == 429 or status >= 500:
                return f"upload to {repo_id} was interrupted ({status} from the Hub{detail}); {resume}"
            return f"the Hub refused the push ({status}{detail})"
        if _is_transport_error(cause):
            reason = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
            if not connected:
                return f"cannot reach the Hub at {endpoint}: {reason}"
            return f"upload to {repo_id} was interrupted ({reason}); {resume}"
        if isinstance(cause, ValueError) and "Invalid metadata in README.md" in str(cause):
            return f"the Hub rejected the model card's metadata: {' '.join(str(cause).split())}"
    return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from, outermost first (huggingface_hub wraps some)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _server_detail(error: HfHubHTTPError) -> str:
    """``: <the server's own message>`` on one line, or nothing."""
    message = getattr(error, "server_message", None) or ""
    message = " ".join(message.split())
    return f": {message}" if message else ""


def _is_transport_error(error: BaseException) -> bool:
    """A connection-level failure (refused, reset, timed out) of whichever HTTP client the hub uses."""
    classes: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError")):
        try:
            classes.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            continue
    return isinstance(error, tuple(classes))


def _default_message(manifest: Manifest) -> str:
    return (
        f"nexttools: {manifest.method} extrapolation (alpha={manifest.alpha:g}, k={manifest.k}) "
        f"from step {manifest.steps[-1]}"
    )


def _human_bytes(size: int) -> str:
    """Decimal units, as the Hub states its limits."""
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"
