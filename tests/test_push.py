"""``nexttools push`` against a loopback Hub, driven by the real huggingface_hub client (no network)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants
from huggingface_hub.repocard import metadata_load

from examples.demo_run import DemoRun
from nexttools import hub
from nexttools.manifest import MANIFEST_NAME, read_manifest, write_manifest
from tests.cli_helpers import invoke
from tests.conftest import copy_tree
from tests.hub_stub import USER, HubStub

TOKEN = "hf_" + secrets.token_hex(17)
REPO = f"{USER}/tiny-grpo-next"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built_output(short_run: DemoRun, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real `nexttools extrapolate` output of the demo run, in small shards (several LFS files)."""
    from nexttools.extract import ExtractOptions, extract
    from nexttools.extrapolate import ExtrapolateOptions, extrapolate

    workdir = tmp_path_factory.mktemp("work")
    extract(ExtractOptions(run=short_run.run, workdir=workdir, device="cpu"))
    folder = workdir / "extrapolated-alpha1.5"
    options = ExtrapolateOptions(
        workdir=workdir,
        out=folder,
        method="linear-rank1",
        max_shard_size=100_000,
        base_model_id="my-org/tiny-llama",
        device="cpu",
    )
    extrapolate(options)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


@pytest.fixture
def output(built_output: Path, tmp_path: Path) -> Path:
    """A private copy: push refreshes its card."""
    return copy_tree(built_output, tmp_path / built_output.name)


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No saved login, no HF_TOKEN/HF_ENDPOINT from the developer's shell, legacy (non-Xet) uploads."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    # huggingface_hub < 1.0 caches a requests session built while the suite was offline; 1.x has none.
    reset_sessions = getattr(huggingface_hub.utils, "reset_sessions", None)
    if reset_sessions is not None:
        reset_sessions()
    yield
    if reset_sessions is not None:
        reset_sessions()  # the next tests are offline again


def asked_visibility(payload: dict) -> str | None:
    """What a create-repo request asked for: ``visibility`` (huggingface_hub >= 1.0) or ``private``."""
    if "visibility" in payload:
        return payload["visibility"]
    return {True: "private", False: "public"}.get(payload.get("private"))


@pytest.fixture
def stub() -> Iterator[HubStub]:
    with HubStub(TOKEN) as server:
        yield server


def run_cli(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str
) -> tuple[int, str, str]:
    """:func:`tests.cli_helpers.invoke` with capfd: huggingface_hub also writes to the real stderr."""
    return invoke(list(args), capfd, monkeypatch)


def push_args(
    stub: HubStub, output: Path, repo: str = REPO, *extra: str, token: str | None = TOKEN
) -> list[str]:
    args = ["push", str(output), repo, "--endpoint", stub.endpoint, *extra]
    return [*args, "--token", token] if token else args


def error_line(code: int, err: str) -> str:
    """The error a failed command printed: exit code 2, one line, no traceback."""
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def local_files(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
    }


def test_push_creates_a_private_repo_and_uploads_every_file_byte_identical(
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    card_before = (output / "README.md").read_bytes()
    code, out, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--private", "--json")

    assert code == 0, err
    assert (output / "README.md").read_bytes() == card_before  # push never changes the output folder
    assert not list(output.parent.glob(f".{output.name}.push-*"))  # its upload view is gone
    (create,) = stub.calls("create")
    assert stub.requests[0] is create  # the repo is created before anything else is sent
    repo = stub.repos[REPO]
    assert repo.private and asked_visibility(repo.commits[0]["create"]) == "private"
    remote = repo.refs["main"]
    files = local_files(output)
    assert set(files) == set(remote) - {".gitattributes"}
    assert all(remote[name] == content for name, content in files.items() if name != "README.md")
    assert {name for name in files if name.endswith(".safetensors")} <= repo.lfs_paths  # shards went by LFS

    summary = json.loads(out)
    (commit,) = [c for c in repo.commits if "ref" in c]
    assert summary["commit_url"] == f"{stub.endpoint}/{REPO}/commit/{summary['commit_oid']}"
    assert summary["repo_id"] == REPO and summary["revision"] == "main" and summary["pr_url"] is None
    assert sorted(summary["files"]) == sorted(files) and summary["card_uploaded"] is True
    assert summary["total_bytes"] == sum(len(content) for name, content in remote.items() if name in files)
    assert commit["summary"] == "nexttools: linear-rank1 extrapolation (alpha=1.5, k=5) from step 80"
    assert summary["commit_url"] in err

    # The published card names the repo id, and its front matter is what the Hub indexes.
    card = remote["README.md"].decode()
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", dtype="auto")' in card
    assert REPO not in card_before.decode()
    (tmp_path / "card.md").write_bytes(remote["README.md"])
    metadata = metadata_load(tmp_path / "card.md")
    assert metadata["base_model"] == "my-org/tiny-llama"
    assert metadata["library_name"] == "transformers"
    assert metadata["tags"] == ["nexttools", "rlvr", "extrapolation", "linear-rank1"]

    # The token went to the Hub as a header, and nowhere else.
    authenticated = [r for r in stub.requests if r.route not in ("lfs-put", "lfs-verify")]
    assert authenticated and all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in authenticated)
    assert TOKEN not in out and TOKEN not in err
    assert not any(TOKEN.encode() in content for content in [*files.values(), *remote.values()])
    assert create.headers["authorization"] == f"Bearer {TOKEN}"


def test_without_private_the_namespace_default_applies(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    assert code == 0, err
    assert asked_visibility(stub.repos[REPO].commits[0]["create"]) is None
    # No visibility check of ours (huggingface_hub < 1.0 asks for the repo's Xet setting on its own).
    assert not [call for call in stub.calls("info") if "expand" not in call.query]


def test_private_push_to_an_existing_public_repo_is_refused(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    stub.add_repo(REPO, private=False)
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--private")
    assert "already exists and is public" in error_line(code, err)
    assert not stub.calls("commit") and not stub.calls("preupload")


def test_existing_readme_is_kept_unless_overwrite_card(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    own_card = b"---\nlicense: mit\n---\n# The owner's own card\n"
    stub.add_repo(REPO, files={"README.md": own_card})

    code, out, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--json")
    assert code == 0, err
    assert stub.repos[REPO].refs["main"]["README.md"] == own_card
    summary = json.loads(out)
    assert summary["card_uploaded"] is False and "README.md" not in summary["files"]
    assert summary["total_bytes"] == sum((output / name).stat().st_size for name in summary["files"])
    assert stub.repos[REPO].refs["main"][MANIFEST_NAME] == (output / MANIFEST_NAME).read_bytes()
    assert "--overwrite-card replaces it" in err

    code, out, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--overwrite-card", "--json")
    assert code == 0, err
    assert REPO in stub.repos[REPO].refs["main"]["README.md"].decode()  # the card rendered for this repo
    assert json.loads(out)["card_uploaded"] is True


def test_revision_branch_is_created_and_reused(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--revision", "next-a1.5")
    assert code == 0, err
    repo = stub.repos[REPO]
    assert set(repo.refs["main"]) == {".gitattributes"}  # main untouched
    published = repo.refs["next-a1.5"]
    assert all(
        published[name] == content for name, content in local_files(output).items() if name != "README.md"
    )

    (output / "README.md").unlink()  # README is outside the fingerprints; push writes it again
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--revision", "next-a1.5")
    assert code == 0, err  # the branch exists now (409 from the Hub is fine)
    assert len(stub.calls("branch")) == 2


def test_create_pr_opens_a_pull_request(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, err = run_cli(
        capfd,
        monkeypatch,
        *push_args(stub, output),
        "--create-pr",
        "--commit-message",
        "NExt α=1.5",
        "--json",
    )
    assert code == 0, err
    (commit,) = stub.calls("commit")
    assert commit.query["create_pr"] == ["1"]
    repo = stub.repos[REPO]
    assert set(repo.refs["main"]) == {".gitattributes"}
    pull = repo.refs["refs/pr/1"]
    assert all(pull[name] == content for name, content in local_files(output).items() if name != "README.md")
    assert repo.commits[-1]["summary"] == "NExt α=1.5"
    pr_url = json.loads(out)["pr_url"]
    assert pr_url == f"{stub.endpoint}/{REPO}/discussions/1" and pr_url in err


def test_create_pr_on_another_branch_is_refused_before_any_request(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output), "--create-pr", "--revision", "dev")
    assert "--create-pr opens a pull request against main" in error_line(code, err)
    assert stub.requests == []


@pytest.mark.parametrize("failure", [0, 500], ids=["connection-dropped", "server-error"])
def test_interrupted_upload_resumes_on_rerun(
    failure: int,
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stub.fail("commit", failure)
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    line = error_line(code, err)
    assert f"upload to {REPO} was interrupted" in line and "re-run the same command to resume" in line
    assert set(stub.repos[REPO].refs["main"]) == {".gitattributes"}  # nothing committed
    shards = [name for name in local_files(output) if name.endswith(".safetensors")]
    assert len(stub.calls("lfs-put")) == len(shards)

    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    assert code == 0, err
    assert len(stub.calls("lfs-put")) == len(shards)  # the shards already uploaded were not sent again
    remote = stub.repos[REPO].refs["main"]
    assert all(
        remote[name] == content for name, content in local_files(output).items() if name != "README.md"
    )


def test_not_logged_in(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output, token=None))
    assert "not logged in to the Hugging Face Hub: run `hf auth login`" in error_line(code, err)
    assert stub.requests == []


def test_token_from_hf_token_and_saved_login(
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    token_file = tmp_path / "saved-token"
    token_file.write_text(TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(token_file))
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output, token=None))
    assert code == 0, err

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "none"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output, token=None), "--overwrite-card")
    assert code == 0, err
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in stub.calls("commit"))
    assert TOKEN not in err


def test_bad_token_401(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "hf_" + secrets.token_hex(17)
    code, out, err = run_cli(capfd, monkeypatch, *push_args(stub, output, token=wrong))
    line = error_line(code, err)
    assert f"the Hub at {stub.endpoint} rejected the token (401: Invalid credentials" in line
    assert "log in with `hf auth login`, set HF_TOKEN or pass --token" in line
    assert wrong not in out + err
    assert REPO not in stub.repos


@pytest.mark.parametrize("exists", [False, True], ids=["new-repo", "existing-repo"])
def test_no_write_access_403(
    exists: bool,
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A namespace the token cannot write to; when the repo exists (public) create_repo looks it up first."""
    if exists:
        stub.add_repo("someone-else/model")
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output, "someone-else/model"))
    assert "no write access to someone-else/model (403: You don't have the rights" in error_line(code, err)
    assert "someone-else/model" not in stub.repos or not stub.calls("commit")
    assert [r.route for r in stub.requests][:2] == ["create", "info"]


@pytest.mark.parametrize(
    ("code_header", "extra", "expected"),
    [
        ("RepoNotFound", (), f"repository {REPO} not found at "),
        ("RevisionNotFound", ("--revision", "gone"), f"revision 'gone' not found in {REPO}"),
    ],
    ids=["repo", "revision"],
)
def test_not_found_404(
    code_header: str,
    extra: tuple[str, ...],
    expected: str,
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The repo or branch disappears between its creation and the upload (deleted, renamed)."""
    stub.fail("preupload", 404, code=code_header, message="not found")
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output), *extra)
    assert expected in error_line(code, err)


def test_unreachable_endpoint_is_named(
    output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    args = ["push", str(output), REPO, "--endpoint", endpoint, "--token", TOKEN]
    code, _, err = run_cli(capfd, monkeypatch, *args)
    assert f"cannot reach the Hub at {endpoint}" in error_line(code, err)


def test_file_over_the_hub_limit_is_refused_before_any_request(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    largest = max((path for path in output.iterdir()), key=lambda path: path.stat().st_size)
    monkeypatch.setattr(hub, "MAX_FILE_BYTES", largest.stat().st_size - 1)
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    line = error_line(code, err)
    assert largest.name in line and "per-file limit" in line and "lower --max-shard-size" in line
    assert stub.requests == []


@pytest.mark.parametrize("damage", ["missing-shard", "changed-shard", "no-manifest"])
def test_incomplete_output_is_refused_before_any_request(
    damage: str,
    stub: HubStub,
    output: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shard = sorted(output.glob("model-*.safetensors"))[0]
    if damage == "missing-shard":
        shard.unlink()
    elif damage == "changed-shard":
        shard.write_bytes(shard.read_bytes()[:-4])
    else:
        (output / MANIFEST_NAME).unlink()
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    line = error_line(code, err)
    assert str(output) in line
    assert stub.requests == []


def test_a_file_holding_the_token_is_never_published(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (output / "notes.txt").write_text(f"pushed with {TOKEN}\n")  # not fingerprinted, but would be uploaded
    write_manifest(output, read_manifest(output))
    code, out, err = run_cli(capfd, monkeypatch, *push_args(stub, output))
    assert "notes.txt contains your Hub token" in error_line(code, err)
    assert TOKEN not in out + err
    assert stub.requests == []


def test_invalid_repo_id(
    stub: HubStub, output: Path, capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = run_cli(capfd, monkeypatch, *push_args(stub, output, "no-owner"))
    assert "invalid repo id 'no-owner': expected owner/name" in error_line(code, err)
    assert stub.requests == []


def test_console_entry_point_honours_hf_endpoint_and_hf_token(
    stub: HubStub, output: Path, tmp_path: Path
) -> None:
    """A real process: the endpoint and token come from the environment, the JSON summary from stdout."""
    env = {
        **os.environ,
        "HF_ENDPOINT": stub.endpoint,
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_OFFLINE": "0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "nexttools", "push", str(output), REPO, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["endpoint"] == stub.endpoint
    assert summary["commit_url"].startswith(f"{stub.endpoint}/{REPO}/commit/")
    assert TOKEN not in result.stdout + result.stderr
    assert all(r.headers["authorization"] == f"Bearer {TOKEN}" for r in stub.calls("commit"))


def test_extrapolate_push_to_hub_writes_then_pushes(
    stub: HubStub,
    built_output: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    workdir = built_output.parent
    out = tmp_path / "pushed"
    code, stdout, err = run_cli(
        capfd,
        monkeypatch,
        *("extrapolate", "--workdir", str(workdir), "--method", "linear-rank1", "--out", str(out)),
        *("--device", "cpu", "--push-to-hub", REPO, "--endpoint", stub.endpoint, "--token", TOKEN, "--json"),
    )
    assert code == 0, err
    document = json.loads(stdout)
    assert document["push"]["repo_id"] == REPO
    remote = stub.repos[REPO].refs["main"]
    assert all(remote[name] == content for name, content in local_files(out).items() if name != "README.md")
    assert TOKEN not in stdout and TOKEN not in err


def test_extrapolate_push_failure_keeps_the_written_output(
    stub: HubStub,
    built_output: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "kept"
    code, _, err = run_cli(
        capfd,
        monkeypatch,
        *("extrapolate", "--workdir", str(built_output.parent), "--method", "linear-rank1"),
        *("--out", str(out), "--device", "cpu", "--push-to-hub", REPO, "--endpoint", stub.endpoint),
    )
    line = error_line(code, err)
    assert "nexttools push" in line and str(out) in line
    assert (out / MANIFEST_NAME).exists()
