"""A loopback stand-in for the part of the Hugging Face Hub API that ``nexttools push`` uses.

Driven by the real ``huggingface_hub`` client through ``HfApi(endpoint="http://127.0.0.1:PORT")``
with ``HF_HUB_DISABLE_XET=1`` (the legacy upload path: preupload, git-LFS batch + basic PUT +
verify, NDJSON commit). The routes and payloads follow huggingface_hub 2.4's own calls:

- ``POST /api/repos/create``                          (``create_repo``; 409 when it exists)
- ``GET  /api/models/{repo}[/revision/{rev}]``         (``repo_info``)
- ``POST /api/models/{repo}/branch/{branch}``          (``create_branch``; 409 when it exists)
- ``HEAD /{repo}/resolve/{rev}/{path}``                (``file_exists``)
- ``POST /api/validate-yaml``                          (README front matter check before upload)
- ``POST /api/models/{repo}/preupload/{rev}``          (regular vs LFS, remote oids)
- ``POST /{repo}.git/info/lfs/objects/batch``          (LFS batch; no actions for stored objects)
- ``PUT  /lfs/{oid}`` and ``POST /lfs/verify``         (basic transfer)
- ``POST /api/models/{repo}/commit/{rev}``             (NDJSON; ``create_pr=1`` opens a PR)

Errors carry the headers the real Hub sends (``X-Error-Code``, ``X-Error-Message``) so that the
client raises its real exception classes. Every request is recorded (method, path, query,
headers). ``fail`` injects a failure on a route: an HTTP error or a dropped connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

USER = "tester"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_ROUTES: list[tuple[str, str, re.Pattern[str]]] = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("GET", "info", re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")),
    ("POST", "branch", re.compile(rf"^/api/models/{_REPO}/branch/(?P<rev>[^/]+)$")),
    ("HEAD", "resolve", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("POST", "validate", re.compile(r"^/api/validate-yaml$")),
    ("POST", "preupload", re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")),
    ("POST", "lfs-batch", re.compile(rf"^/{_REPO}\.git/info/lfs/objects/batch$")),
    ("PUT", "lfs-put", re.compile(r"^/lfs/(?P<oid>[0-9a-f]{64})$")),
    ("POST", "lfs-verify", re.compile(r"^/lfs/verify$")),
    ("POST", "commit", re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")),
]
WRITE_ROUTES = {"create", "branch", "preupload", "lfs-batch", "commit"}


def git_blob_oid(content: bytes) -> str:
    """git's object id of a blob, which the Hub reports for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """A model repo: visibility and the files of each ref (branches and ``refs/pr/N``)."""

    owner: str
    private: bool
    refs: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: list[dict[str, Any]] = field(default_factory=list)
    lfs_paths: set[str] = field(default_factory=set)


@dataclass
class Recorded:
    method: str
    route: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


class HubStub:
    """The server and its state. ``token`` is the only valid credential; ``USER`` owns the token."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Recorded] = []
        self.failures: dict[str, list[tuple[int, str | None, str]]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HubStub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def add_repo(self, repo_id: str, *, private: bool = False, files: dict[str, bytes] | None = None) -> Repo:
        """A repo that already exists (owned by its namespace; only ``USER``'s repos are writable)."""
        repo = Repo(owner=repo_id.split("/")[0], private=private)
        repo.refs["main"] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        repo.refs["main"].update(files or {})
        self.repos[repo_id] = repo
        return repo

    def fail(
        self, route: str, status: int, *, code: str | None = None, message: str = "", times: int = 1
    ) -> None:
        """Make the next ``times`` calls to ``route`` fail: HTTP ``status`` (0: drop the connection)."""
        self.failures.setdefault(route, []).extend([(status, code, message)] * times)

    def calls(self, route: str) -> list[Recorded]:
        return [request for request in self.requests if request.route == route]

    # -- request handling (runs on server threads) ------------------------------------------------

    def handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        path, query = unquote(url.path), parse_qs(url.query)
        for route_method, route, pattern in _ROUTES:  # noqa: B007 (the matching route is used below)
            match = pattern.match(path)
            if match and route_method == method:
                break
        else:
            _send(handler, 404, {"error": f"no route for {method} {path}"})
            return
        body = _read_body(handler)
        headers = {name.lower(): value for name, value in handler.headers.items()}
        with self._lock:
            self.requests.append(Recorded(method, route, path, query, headers))
            injected = self.failures.get(route)
            failure = injected.pop(0) if injected else None
        if failure is not None:
            status, code, message = failure
            if status == 0:
                handler.close_connection = True
                handler.connection.shutdown(2)  # the peer sees the connection drop without a response
                return
            _send(handler, status, {"error": message}, error_code=code, error_message=message)
            return
        if route not in ("lfs-put", "lfs-verify") and not self._authorised(headers):
            message = "Invalid credentials in Authorization header"
            _send(handler, 401, {"error": message}, error_message=message)
            return
        with self._lock:
            getattr(self, "_" + route.replace("-", "_"))(handler, match.groupdict(), query, body)

    def _authorised(self, headers: dict[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.token}"

    def _repo_or_404(self, handler: BaseHTTPRequestHandler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            _send(handler, 404, {"error": "Repository not found"}, error_code="RepoNotFound")
        return repo

    def _writable(self, handler: BaseHTTPRequestHandler, repo: Repo) -> bool:
        if repo.owner != USER:
            message = "You don't have the rights to write to this repo"
            _send(handler, 403, {"error": message}, error_message=message)
            return False
        return True

    def _files_or_404(self, handler: BaseHTTPRequestHandler, repo: Repo, rev: str) -> dict[str, bytes] | None:
        files = repo.refs.get(unquote(rev))
        if files is None:
            _send(handler, 404, {"error": "Invalid rev id"}, error_code="RevisionNotFound")
        return files

    def _create(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        payload = json.loads(body)
        owner = payload.get("organization") or USER
        repo_id = f"{owner}/{payload['name']}"
        if owner != USER:
            message = "You don't have the rights to create a model under this namespace"
            _send(handler, 403, {"error": message}, error_message=message)
        elif repo_id in self.repos:
            _send(handler, 409, {"error": "You already created this model repo", "url": self._url(repo_id)})
        else:
            # huggingface_hub >= 1.0 sends {"visibility": "private"}, older ones {"private": true}.
            private = payload.get("visibility") == "private" or payload.get("private") is True
            self.add_repo(repo_id, private=private)
            self.repos[repo_id].commits.append({"create": payload})
            _send(handler, 200, {"url": self._url(repo_id)})

    def _info(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        if repo is None:
            return
        files = self._files_or_404(handler, repo, params.get("rev") or "main")
        if files is None:
            return
        sha = self._ref_sha(repo, params.get("rev") or "main")
        siblings = [{"rfilename": name} for name in sorted(files)]
        _send(handler, 200, {"id": params["repo"], "private": repo.private, "sha": sha, "siblings": siblings})

    def _branch(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        if repo is None or not self._writable(handler, repo):
            return
        branch = unquote(params["rev"])
        if branch in repo.refs:
            _send(handler, 409, {"error": "Reference already exists"})
            return
        start = (json.loads(body) if body else {}).get("startingPoint", "main")
        repo.refs[branch] = dict(repo.refs[start])
        _send(handler, 200, {})

    def _resolve(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        files = None if repo is None else self._files_or_404(handler, repo, params["rev"])
        if files is None:
            return
        content = files.get(params["path"])
        if content is None:
            _send(handler, 404, {"error": "Entry not found"}, error_code="EntryNotFound")
            return
        assert repo is not None
        headers = {
            "X-Repo-Commit": self._ref_sha(repo, params["rev"]),
            "ETag": f'"{git_blob_oid(content)}"',
            "Content-Length": str(len(content)),
        }
        _send(handler, 200, None, extra_headers=headers)

    def _validate(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        content = json.loads(body)["content"]
        match = re.match(r"^---\n(.*?)\n---\n", content, flags=re.DOTALL)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as error:
            _send(handler, 400, {"errors": [{"message": f"invalid YAML: {error}"}]})
            return
        problems = _metadata_problems(metadata)
        if problems:
            _send(handler, 400, {"errors": [{"message": problem} for problem in problems]})
        else:
            _send(handler, 200, {"errors": [], "warnings": []})

    def _preupload(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        if repo is None or not self._writable(handler, repo):
            return
        files = self._files_or_404(handler, repo, params["rev"])
        if files is None:
            return
        answer = []
        for entry in json.loads(body)["files"]:
            lfs = entry["path"].endswith(".safetensors") or entry["size"] > 10 * 2**20
            remote = files.get(entry["path"])
            oid = None
            if remote is not None:
                oid = (
                    hashlib.sha256(remote).hexdigest()
                    if entry["path"] in repo.lfs_paths
                    else git_blob_oid(remote)
                )
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        _send(handler, 200, {"files": answer})

    def _lfs_batch(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        if repo is None or not self._writable(handler, repo):
            return
        objects = []
        for item in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs/{item['oid']}"},
                    "verify": {"href": f"{self.endpoint}/lfs/verify"},
                }
            objects.append(entry)
        _send(handler, 200, {"transfer": "basic", "objects": objects})

    def _lfs_put(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != params["oid"]:
            _send(handler, 400, {"error": "content does not match its oid"})
            return
        self.lfs[params["oid"]] = body
        _send(handler, 200, None)

    def _lfs_verify(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        item = json.loads(body)
        stored = self.lfs.get(item["oid"])
        _send(handler, 200 if stored is not None and len(stored) == item["size"] else 404, {})

    def _commit(self, handler: BaseHTTPRequestHandler, params: dict, query: dict, body: bytes) -> None:
        repo = self._repo_or_404(handler, params["repo"])
        if repo is None or not self._writable(handler, repo):
            return
        rev = unquote(params["rev"])
        files = self._files_or_404(handler, repo, rev)
        if files is None:
            return
        create_pr = query.get("create_pr") == ["1"]
        target = dict(files)
        header: dict[str, Any] = {}
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                header = value
            elif item["key"] == "file":
                target[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    _send(handler, 422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                target[value["path"]] = self.lfs[value["oid"]]
                repo.lfs_paths.add(value["path"])
            elif item["key"] == "deletedFile":
                target.pop(value["path"], None)
        ref = rev
        if create_pr:
            ref = f"refs/pr/{sum(name.startswith('refs/pr/') for name in repo.refs) + 1}"
        repo.refs[ref] = target
        repo.commits.append({"ref": ref, "summary": header.get("summary"), "files": sorted(target)})
        sha = self._ref_sha(repo, ref)
        answer = {"commitUrl": f"{self._url(params['repo'])}/commit/{sha}", "commitOid": sha}
        if create_pr:
            answer["pullRequestUrl"] = f"{self._url(params['repo'])}/discussions/{ref.rsplit('/', 1)[1]}"
        _send(handler, 200, answer)

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"

    @staticmethod
    def _ref_sha(repo: Repo, ref: str) -> str:
        digest = hashlib.sha1(ref.encode())
        for name, content in sorted(repo.refs.get(unquote(ref), {}).items()):
            digest.update(name.encode() + hashlib.sha1(content).digest())
        return digest.hexdigest()


def _metadata_problems(metadata: object) -> list[str]:
    """The checks of the Hub's metadata validator that a generated card could fail."""
    if metadata is None:
        return []
    if not isinstance(metadata, dict):
        return ["metadata must be a mapping"]
    problems = []
    for key in ("base_model", "tags"):
        value = metadata.get(key)
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))
        ):
            problems.append(f'"{key}" must be a string or a list of strings')
    for key in ("library_name", "license", "base_model_relation"):
        if key in metadata and not isinstance(metadata[key], str):
            problems.append(f'"{key}" must be a string')
    return problems


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    """The request body, plain (Content-Length) or chunked (httpx streams file uploads that way)."""
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                handler.rfile.readline()
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


def _send(
    handler: BaseHTTPRequestHandler,
    status: int,
    payload: object,
    *,
    error_code: str | None = None,
    error_message: str | None = None,
    extra_headers: dict[str, str] | None = None,
) -> None:
    data = b"" if payload is None else json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    if error_code:
        handler.send_header("X-Error-Code", error_code)
    if error_message:
        handler.send_header("X-Error-Message", error_message)
    for name, value in (extra_headers or {}).items():
        handler.send_header(name, value)
    if "Content-Length" not in (extra_headers or {}):
        handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    if handler.command != "HEAD":
        handler.wfile.write(data)


def _handler_for(stub: HubStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            stub.handle(self, "GET")

        def do_HEAD(self) -> None:
            stub.handle(self, "HEAD")

        def do_POST(self) -> None:
            stub.handle(self, "POST")

        def do_PUT(self) -> None:
            stub.handle(self, "PUT")

        def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
            return

    return Handler
