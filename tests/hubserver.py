"""A local server that speaks the Hugging Face Hub's HTTP protocol, for tests.

Pure standard library: a :class:`http.server.ThreadingHTTPServer` bound to ``127.0.0.1`` on a free port,
holding an in-memory store of repositories (``repo -> commits -> {path: bytes}``, plus branches and tags).
The real ``huggingface_hub`` client is pointed at it through ``HF_ENDPOINT`` (see ``tests/conftest_hub.py``),
so tests exercise the client's own cache, revision, offline, resume and upload code.

Implemented endpoints (exactly what ``huggingface_hub`` 2.x calls for downloads, listings and uploads):

====================================================  =====================================================
``HEAD|GET /{repo}/resolve/{rev}/{path}``             file metadata / content; ``Range`` (206); error codes
``GET /api/{models|datasets}/{repo}``                 repo info (``sha``, ``siblings``)
``GET /api/.../{repo}/revision/{rev}``                repo info at a revision
``GET /api/.../{repo}/tree/{rev}[/{path}]``           tree listing, ``recursive``, ``Link`` pagination
``GET /api/.../{repo}/refs``                          branches and tags
``POST /api/repos/create``                            create a repo (initial commit with ``.gitattributes``)
``POST /api/.../{repo}/preupload/{rev}``              upload modes (``regular`` unless ``lfs_uploads``)
``POST /api/.../{repo}/commit/{rev}``                 NDJSON commit (files, LFS files, deletions)
``POST|DELETE /api/.../{repo}/branch/{name}``         create / delete a branch
``POST /api/.../{repo}/tag/{rev}``                    create a tag
``POST /api/validate-yaml``                           README metadata check (always valid)
``GET /api/agent-harnesses``                          the client's user-agent registry (empty)
``POST /{repo}.git/info/lfs/objects/batch``           LFS batch API (basic transfer, only with ``lfs_uploads``)
``PUT /_lfs/objects/{oid}``, ``POST /_lfs/verify``     where the LFS batch API sends the client
====================================================  =====================================================

Xet storage is *not* implemented: the server never sends ``X-Xet-Hash`` headers nor ``xetHash`` tree fields, so
the client downloads over plain HTTP, and it answers ``uploadMode: regular`` by default so the client sends file
contents inline (base64) in the commit. With ``lfs_uploads=True`` it answers ``lfs`` for LFS-eligible files; the
client then uses the LFS batch API only if Xet is disabled (``huggingface_hub.constants.HF_HUB_DISABLE_XET``),
because with ``hf_xet`` installed it would upload through the Xet protocol, which this server does not speak.

Test knobs: :attr:`HubServer.ranges_supported`, :meth:`HubServer.truncate_next`, :meth:`HubServer.corrupt`, :meth:`HubServer.stall_next` (a body that
stops arriving), :meth:`HubServer.fail_requests` (HTTP 5xx/429), :meth:`HubServer.stall_requests` (an API call that
does not return), the request log
:attr:`HubServer.requests`, and direct store edits (:meth:`create_repo`, :meth:`commit`, :meth:`tag`,
:meth:`branch`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = ["HubServer", "RequestRecord", "git_blob_sha1", "is_lfs_path"]

#: Suffixes the default ``.gitattributes`` of a Hub repo stores in LFS (a subset is enough here).
LFS_SUFFIXES: tuple[str, ...] = (
    ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".npy", ".h5", ".msgpack", ".onnx", ".pkl", ".zip",
)
#: Files at least this large are stored in LFS whatever their suffix (the Hub's threshold is 10 MB).
LFS_THRESHOLD = 10 * 1024 * 1024

_DEFAULT_GITATTRIBUTES = b"".join(
    f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n".encode() for suffix in LFS_SUFFIXES
)
_REPO_TYPE_PREFIXES = {"datasets": "dataset", "spaces": "space"}
_API_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_API_SUBPATHS = {"revision", "tree", "preupload", "commit", "refs", "branch", "tag"}
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_TIMESTAMP = "2024-01-01T00:00:00.000Z"


def git_blob_sha1(data: bytes) -> str:
    """The git object id of ``data`` stored as a blob: ``sha1(b"blob <size>\\0" + data)``."""
    h = hashlib.sha1(f"blob {len(data)}\0".encode())
    h.update(data)
    return h.hexdigest()


def is_lfs_path(path: str, size: int) -> bool:
    """Whether the Hub would store this file in LFS (by suffix, as ``.gitattributes`` says, or by size)."""
    return path.lower().endswith(LFS_SUFFIXES) or size >= LFS_THRESHOLD


@dataclass(frozen=True)
class _Blob:
    """File contents with the hashes the Hub advertises for them."""

    data: bytes
    git_sha1: str
    sha256: str

    @classmethod
    def of(cls, data: bytes) -> _Blob:
        return cls(bytes(data), git_blob_sha1(data), hashlib.sha256(data).hexdigest())

    def lfs_pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.data)}\n"
        ).encode()


@dataclass
class _Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, _Blob]


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> str | None:
        """Commit sha for a branch, tag, full sha or unambiguous sha prefix (>= 7 chars), else ``None``."""
        if revision in self.branches:
            return self.branches[revision]
        if revision in self.tags:
            return self.tags[revision]
        if revision in self.commits:
            return revision
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            found = [sha for sha in self.commits if sha.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None


@dataclass(frozen=True)
class RequestRecord:
    """One request the server answered (appended to :attr:`HubServer.requests`)."""

    method: str
    path: str  # URL path, still percent-encoded
    query: str
    headers: dict[str, str]
    status: int
    body_bytes_sent: int = 0

    @property
    def range(self) -> str | None:
        """The ``Range`` request header, if any."""
        for key, value in self.headers.items():
            if key.lower() == "range":
                return value
        return None

    @property
    def is_resolve(self) -> bool:
        """Whether this is a ``/resolve/`` (file) request."""
        return "/resolve/" in self.path


@dataclass
class _Fault:
    repo_id: str | None
    path: str
    remaining: int | None  # None = forever
    n_bytes: int = 0
    mode: str = "drop"
    seconds: float = 0.0
    status: int = 0

    def matches(self, repo_id: str, path: str) -> bool:
        return self.path == path and (self.repo_id is None or self.repo_id == repo_id)


class _HTTPError(Exception):
    """Raised inside handlers to answer with an error status and Hub error headers."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})


class HubServer:
    """An in-memory Hugging Face Hub on ``127.0.0.1``.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. The store is guarded by a lock; handlers run in
    daemon threads and every socket has a timeout.

    Args:
        lfs_uploads: answer ``uploadMode: "lfs"`` in ``preupload`` for LFS-eligible files (see module docstring).
        tree_page_size: entries per page of the tree API (the Hub uses 1000); lower it to test pagination.
        socket_timeout: seconds before an idle connection is dropped.
    """

    def __init__(self, *, lfs_uploads: bool = False, tree_page_size: int = 1000, socket_timeout: float = 10.0):
        self.lfs_uploads = lfs_uploads
        self.tree_page_size = tree_page_size
        self.socket_timeout = socket_timeout
        #: ``False``: ignore ``Range`` headers (answer 200 with the whole file, like a server without range support).
        self.ranges_supported = True
        self.requests: list[RequestRecord] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lfs_objects: dict[str, _Blob] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0  # requests being handled; logged only after their response is sent
        self._counter = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._release = threading.Event()  # set to end every stall now

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> HubServer:
        """Bind to a free loopback port and serve in a background thread."""
        if self._httpd is not None:
            return self
        handler = type("_BoundHandler", (_Handler,), {"hub": self, "timeout": self.socket_timeout})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # keep-alive connections must not block shutdown
        httpd.timeout = self.socket_timeout
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hubserver", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the listening socket."""
        if self._httpd is None:
            return
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
        self._thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the server listens on."""
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:43123`` (what ``HF_ENDPOINT`` should be)."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ store, direct edits (for tests)

    def create_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes] | None = None,
        *,
        repo_type: str = "model",
        private: bool = False,
        gitattributes: bool = True,
        message: str = "initial commit",
    ) -> str:
        """Create a repo whose ``main`` branch holds ``files`` (plus ``.gitattributes``); return the commit sha."""
        with self._lock:
            key = (repo_type, repo_id)
            if key in self._repos:
                raise ValueError(f"repo {repo_type}:{repo_id} already exists")
            repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private)
            self._repos[key] = repo
            initial: dict[str, bytes | None] = {}
            if gitattributes:
                initial[".gitattributes"] = _DEFAULT_GITATTRIBUTES
            initial.update(files or {})
            return self._new_commit(repo, "main", initial, message, create_branch=True)

    def commit(
        self,
        repo_id: str,
        files: Mapping[str, bytes | None],
        *,
        branch: str = "main",
        repo_type: str = "model",
        message: str = "update",
    ) -> str:
        """Add/replace files (``None`` deletes) in a new commit on ``branch``; return the new commit sha."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            return self._new_commit(repo, branch, dict(files), message, create_branch=branch not in repo.branches)

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Point tag ``tag`` at ``revision``; return the commit sha."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            sha = self._resolve_or_raise(repo, revision)
            repo.tags[tag] = sha
            return sha

    def branch(self, repo_id: str, name: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Point branch ``name`` at ``revision``; return the commit sha."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            sha = self._resolve_or_raise(repo, revision)
            repo.branches[name] = sha
            return sha

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision``, as the server holds them."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            sha = self._resolve_or_raise(repo, revision)
            return {path: blob.data for path, blob in repo.commits[sha].files.items()}

    def head(self, repo_id: str, branch: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha of ``branch``."""
        with self._lock:
            return self._resolve_or_raise(self._get_repo(repo_type, repo_id), branch)

    def etag(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """The etag the client will cache this file under (sha256 for LFS files, git blob sha1 otherwise)."""
        with self._lock:
            repo = self._get_repo(repo_type, repo_id)
            blob = repo.commits[self._resolve_or_raise(repo, revision)].files[path]
            return blob.sha256 if is_lfs_path(path, len(blob.data)) else blob.git_sha1

    # ------------------------------------------------------------------ fault injection and request log

    def truncate_next(
        self, path: str, n_bytes: int, *, repo_id: str | None = None, times: int = 1, mode: str = "drop"
    ) -> None:
        """Cut the body of the next ``times`` GETs of ``path`` (any repo unless ``repo_id``) after ``n_bytes``.

        ``mode="drop"``: advertise the full ``Content-Length``, send ``n_bytes`` and close the connection (a network
        failure mid-download; the client sees a protocol error). ``mode="short"``: advertise and send only ``n_bytes``
        (a well-formed but incomplete response; the client sees a size mismatch).
        """
        if mode not in ("drop", "short"):
            raise ValueError(f"mode must be 'drop' or 'short', got {mode!r}")
        with self._lock:
            self._faults.append(_Fault(repo_id, path, times, n_bytes=n_bytes, mode=mode))

    def corrupt(self, path: str, *, repo_id: str | None = None, times: int | None = None) -> None:
        """Serve ``path`` with flipped bytes (same length) while advertising the true etag/sha256.

        ``times=None`` corrupts every GET until :meth:`clear_faults`.
        """
        with self._lock:
            self._faults.append(_Fault(repo_id, path, times, mode="corrupt"))

    def stall_next(self, path: str, n_bytes: int, seconds: float, *, repo_id: str | None = None, times: int = 1) -> None:
        """The next ``times`` GETs of file ``path``: send the headers and ``n_bytes`` of the body, then hang for
        ``seconds`` (or until :meth:`clear_faults` / :meth:`stop`) and drop the connection (a stalled server)."""
        with self._lock:
            self._faults.append(_Fault(repo_id, path, times, n_bytes=n_bytes, mode="stall", seconds=seconds))

    def fail_requests(self, url_part: str, status: int, *, times: int | None = 1) -> None:
        """Answer the next ``times`` requests whose URL path contains ``url_part`` with HTTP ``status`` (e.g. 503,
        429) before routing them; ``times=None``: until :meth:`clear_faults`."""
        with self._lock:
            self._faults.append(_Fault(None, url_part, times, mode="status", status=status))

    def stall_requests(self, url_part: str, seconds: float, *, times: int | None = 1) -> None:
        """Hold the next ``times`` requests whose URL path contains ``url_part`` for ``seconds`` before answering
        (or until :meth:`clear_faults` / :meth:`stop`): a Hub API call that does not return."""
        with self._lock:
            self._faults.append(_Fault(None, url_part, times, mode="hold", seconds=seconds))

    def clear_faults(self) -> None:
        """Forget every pending fault, and release requests being stalled."""
        with self._lock:
            self._faults.clear()
            self._release.set()
            self._release = threading.Event()

    def clear_requests(self) -> None:
        """Empty the request log, once every request already being handled has been logged.

        A handler logs its request after the response is sent, so the client can move on before the
        record lands; waiting here keeps a late record of an earlier call out of the next one's log.
        """
        with self._idle:
            self._idle.wait_for(lambda: self._inflight == 0, timeout=5.0)
            self.requests.clear()

    def content_gets(self, path: str | None = None) -> list[RequestRecord]:
        """Logged ``GET /resolve/`` requests that sent file content (optionally only for file ``path``)."""
        with self._lock:
            records = list(self.requests)
        out = []
        for r in records:
            if r.method != "GET" or not r.is_resolve or r.status not in (200, 206):
                continue
            if path is not None and not unquote(r.path).endswith("/" + path):
                continue
            out.append(r)
        return out

    # ------------------------------------------------------------------ internals

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def _log(self, record: RequestRecord) -> None:
        with self._idle:
            self.requests.append(record)
            self._inflight -= 1
            self._idle.notify_all()

    def _take_request_fault(self, url_path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.mode in ("status", "hold") and fault.path in url_path:
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _take_fault(self, repo_id: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.mode not in ("status", "hold") and fault.matches(repo_id, path):
                    if fault.remaining is not None:
                        fault.remaining -= 1
                        if fault.remaining <= 0:
                            self._faults.remove(fault)
                    return fault
        return None

    def _get_repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HTTPError(404, "Repository not found", "RepoNotFound")
        return repo

    def _resolve_or_raise(self, repo: _Repo, revision: str) -> str:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return sha

    def _new_commit(
        self,
        repo: _Repo,
        branch: str,
        changes: Mapping[str, bytes | None],
        message: str,
        *,
        create_branch: bool = False,
        deleted_folders: Iterable[str] = (),
        blobs: Mapping[str, _Blob] | None = None,
    ) -> str:
        """Apply ``changes`` (and ``blobs``, already hashed) on top of ``branch``; return the new sha."""
        if branch in repo.branches:
            parent: str | None = repo.branches[branch]
        elif create_branch:
            parent = repo.branches.get("main")
        else:
            raise _HTTPError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        files = dict(repo.commits[parent].files) if parent is not None else {}
        for folder in deleted_folders:
            prefix = folder.rstrip("/") + "/"
            files = {p: b for p, b in files.items() if not p.startswith(prefix)}
        for path, data in changes.items():
            if data is None:
                files.pop(path, None)
            else:
                files[path] = _Blob.of(data)
        files.update(blobs or {})
        self._counter += 1
        digest = hashlib.sha1(
            json.dumps(
                {
                    "n": self._counter,
                    "repo": f"{repo.repo_type}:{repo.repo_id}",
                    "parent": parent,
                    "message": message,
                    "files": {p: b.sha256 for p, b in sorted(files.items())},
                },
                sort_keys=True,
            ).encode()
        ).hexdigest()
        repo.commits[digest] = _Commit(digest, parent, message, files)
        repo.branches[branch] = digest
        return digest


class _Handler(BaseHTTPRequestHandler):
    """Routes one HTTP request to the :class:`HubServer` bound as ``hub`` (set by :meth:`HubServer.start`)."""

    hub: HubServer
    protocol_version = "HTTP/1.1"
    server_version = "sae-hooks-test-hub/1"

    # -------------------------------------------------------------- plumbing

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence stderr logging
        pass

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self._method = method
        self._url_path = split.path
        self._query = parse_qs(split.query)
        self._status = 0
        self._sent = 0
        self.hub._begin()
        try:
            fault = self.hub._take_request_fault(unquote(split.path))
            if fault is not None and fault.mode == "hold":
                self.hub._release.wait(fault.seconds)
            if fault is not None and fault.mode == "status":
                raise _HTTPError(fault.status, f"injected HTTP {fault.status}", headers={"Retry-After": "0"})
            self._route(method, [unquote(s) for s in split.path.split("/")[1:]])
        except _HTTPError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub._log(
                RequestRecord(method, split.path, split.query, dict(self.headers.items()), self._status, self._sent)
            )

    def _read_body(self) -> bytes:
        """Request body, from ``Content-Length`` or chunked transfer encoding (bounded loop)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            for _ in range(1_000_000):
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    for _ in range(100):
                        if self.rfile.readline() in (b"\r\n", b"\n", b""):
                            break
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as e:
            raise _HTTPError(400, f"invalid JSON body: {e}") from e

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        self._status = status
        self.send_response(status)
        hdrs = {"Content-Type": "application/json", "Content-Length": str(len(body))}
        hdrs.update(headers or {})
        for key, value in hdrs.items():
            self.send_header(key, value)
        self.end_headers()
        if self._method != "HEAD" and body:
            self.wfile.write(body)
            self._sent = len(body)

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _send_error(self, err: _HTTPError) -> None:
        headers = {"X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, err.status, headers)

    # -------------------------------------------------------------- routing

    def _route(self, method: str, segs: list[str]) -> None:
        if segs and segs[0] == "api":
            return self._route_api(method, segs[1:])
        if len(segs) >= 2 and segs[0] == "_lfs":
            return self._route_lfs_storage(method, segs[1:])
        # LFS batch: /{prefix?}{repo_id}.git/info/lfs/objects/batch
        if method == "POST" and segs[-4:] == ["info", "lfs", "objects", "batch"]:
            repo_type, repo_segs = self._split_type_prefix(segs[:-4])
            if repo_segs and repo_segs[-1].endswith(".git"):
                repo_segs[-1] = repo_segs[-1][: -len(".git")]
                return self._lfs_batch(repo_type, "/".join(repo_segs))
        # /{prefix?}{repo_id}/resolve/{revision}/{path...}
        repo_type, rest = self._split_type_prefix(segs)
        for n in (1, 2):
            if len(rest) > n + 2 and rest[n] == "resolve":
                if method not in ("GET", "HEAD"):
                    raise _HTTPError(405, "method not allowed")
                return self._resolve(repo_type, "/".join(rest[:n]), rest[n + 1], "/".join(rest[n + 2 :]))
        raise _HTTPError(404, f"no route for {method} {self._url_path}")

    @staticmethod
    def _split_type_prefix(segs: list[str]) -> tuple[str, list[str]]:
        if segs and segs[0] in _REPO_TYPE_PREFIXES and len(segs) > 1:
            return _REPO_TYPE_PREFIXES[segs[0]], list(segs[1:])
        return "model", list(segs)

    def _route_api(self, method: str, segs: list[str]) -> None:
        if segs == ["agent-harnesses"] and method == "GET":  # huggingface_hub's user-agent registry
            return self._send_json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            self._read_body()
            return self._send_json({"errors": [], "warnings": []})
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo()
        if len(segs) < 2 or segs[0] not in _API_REPO_TYPES:
            raise _HTTPError(404, f"no route for {method} {self._url_path}")
        repo_type = _API_REPO_TYPES[segs[0]]
        rest = segs[1:]
        # repo ids are "name" or "namespace/name"
        if len(rest) >= 2 and rest[1] in _API_SUBPATHS and (len(rest) >= 3 or rest[1] == "refs"):
            repo_id, tail = rest[0], rest[1:]
        else:
            repo_id, tail = "/".join(rest[:2]), rest[2:]
        if method == "GET" and not tail:
            return self._repo_info(repo_type, repo_id, "main")
        if method == "GET" and len(tail) == 2 and tail[0] == "revision":
            return self._repo_info(repo_type, repo_id, tail[1])
        if method == "GET" and len(tail) >= 2 and tail[0] == "tree":
            return self._tree(repo_type, repo_id, tail[1], "/".join(tail[2:]))
        if method == "GET" and tail == ["refs"]:
            return self._refs(repo_type, repo_id)
        if method == "POST" and len(tail) == 2 and tail[0] == "preupload":
            return self._preupload(repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "commit":
            return self._commit(repo_type, repo_id, tail[1])
        if len(tail) == 2 and tail[0] == "branch" and method in ("POST", "DELETE"):
            return self._branch(method, repo_type, repo_id, tail[1])
        if method == "POST" and len(tail) == 2 and tail[0] == "tag":
            return self._tag(repo_type, repo_id, tail[1])
        raise _HTTPError(404, f"no route for {method} {self._url_path}")

    # -------------------------------------------------------------- downloads

    def _resolve(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            sha = hub._resolve_or_raise(repo, revision)
            blob = repo.commits[sha].files.get(path)
        if blob is None:
            raise _HTTPError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": sha})
        data = blob.data
        size = len(data)
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": sha,
        }
        if hub.ranges_supported:
            headers["Accept-Ranges"] = "bytes"
        if is_lfs_path(path, size):
            headers["ETag"] = f'"{blob.sha256}"'
            headers["X-Linked-Etag"] = f'"{blob.sha256}"'
            headers["X-Linked-Size"] = str(size)
        else:
            headers["ETag"] = f'"{blob.git_sha1}"'

        status, start, end = 200, 0, size  # [start, end)
        range_header = self.headers.get("Range") if hub.ranges_supported else None
        if range_header:
            m = _RANGE_RE.match(range_header)
            if m is None or (not m.group(1) and not m.group(2)):
                raise _HTTPError(416, f"invalid range {range_header!r}", headers={"Content-Range": f"bytes */{size}"})
            first, last = m.group(1), m.group(2)
            if first:
                start = int(first)
                end = min(int(last) + 1, size) if last else size
            else:  # suffix range: last N bytes
                start = max(size - int(last), 0)
            if start >= size or start >= end:
                raise _HTTPError(416, "range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"

        fault = hub._take_fault(repo_id, path) if self._method == "GET" else None
        if fault is not None and fault.mode == "corrupt":
            data = bytes(b ^ 0xFF for b in data)
        body = data[start:end]

        if fault is not None and fault.mode == "stall":
            self._status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[: fault.n_bytes])
            self.wfile.flush()
            self._sent = min(fault.n_bytes, len(body))
            self.hub._release.wait(fault.seconds)
            self.close_connection = True
            return
        if fault is not None and fault.mode in ("drop", "short"):
            cut = max(0, min(fault.n_bytes, len(body)))
            advertised = len(body) if fault.mode == "drop" else cut
            self._status = status
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(advertised)}.items():
                self.send_header(key, value)
            if fault.mode == "drop":
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self._sent = cut
            self.close_connection = True
            return
        self._send(status, body, headers)

    def _repo_info(self, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            sha = hub._resolve_or_raise(repo, revision)
            files = dict(repo.commits[sha].files)
        with_blobs = _truthy(self._query.get("blobs"))
        siblings = []
        for path in sorted(files):
            entry: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                blob = files[path]
                entry["size"] = len(blob.data)
                entry["blobId"] = blob.git_sha1
                if is_lfs_path(path, len(blob.data)):
                    entry["lfs"] = {"size": len(blob.data), "sha256": blob.sha256, "pointerSize": len(blob.lfs_pointer())}
            siblings.append(entry)
        author = repo_id.split("/")[0] if "/" in repo_id else None
        self._send_json(
            {
                "_id": hashlib.sha1(f"{repo_type}:{repo_id}".encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "author": author,
                "sha": sha,
                "lastModified": _TIMESTAMP,
                "createdAt": _TIMESTAMP,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            sha = hub._resolve_or_raise(repo, revision)
            files = dict(repo.commits[sha].files)
        recursive = _truthy(self._query.get("recursive"))
        prefix = path.strip("/") + "/" if path.strip("/") else ""
        if prefix and not any(p.startswith(prefix) for p in files):
            raise _HTTPError(404, f"{path} does not exist on {revision}", "EntryNotFound", {"X-Repo-Commit": sha})
        dirs: set[str] = set()
        entries_files = []
        for p in sorted(files):
            if not p.startswith(prefix):
                continue
            rel = p[len(prefix) :]
            parts = rel.split("/")
            # every folder between prefix and the file
            for i in range(1, len(parts)):
                if recursive or i == 1:
                    dirs.add(prefix + "/".join(parts[:i]))
            if recursive or len(parts) == 1:
                entries_files.append(p)
        entries: list[dict[str, Any]] = [
            {"type": "directory", "oid": hashlib.sha1(f"tree:{sha}:{d}".encode()).hexdigest(), "size": 0, "path": d}
            for d in sorted(dirs)
        ]
        for p in entries_files:
            blob = files[p]
            entry: dict[str, Any] = {"type": "file", "oid": blob.git_sha1, "size": len(blob.data), "path": p}
            if is_lfs_path(p, len(blob.data)):
                pointer = blob.lfs_pointer()
                entry["oid"] = git_blob_sha1(pointer)
                entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": len(pointer)}
            entries.append(entry)

        cursor = int((self._query.get("cursor") or ["0"])[0])
        page_size = max(1, hub.tree_page_size)
        page = entries[cursor : cursor + page_size]
        headers = {}
        if cursor + page_size < len(entries):
            params = "&".join(
                f"{k}={quote(v[0], safe='')}" for k, v in sorted(self._query.items()) if k != "cursor"
            )
            next_url = f"{hub.url}{self._url_path}?{params + '&' if params else ''}cursor={cursor + page_size}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        self._send_json(page, headers=headers)

    def _refs(self, repo_type: str, repo_id: str) -> None:
        with self.hub._lock:
            repo = self.hub._get_repo(repo_type, repo_id)
            branches = dict(repo.branches)
            tags = dict(repo.tags)
        self._send_json(
            {
                "branches": [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": s} for n, s in sorted(branches.items())],
                "converts": [],
                "tags": [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": s} for n, s in sorted(tags.items())],
                "pullRequests": [],
            }
        )

    # -------------------------------------------------------------- uploads

    def _create_repo(self) -> None:
        body = self._json_body()
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _HTTPError(400, "missing repo name")
        org = body.get("organization")
        repo_id = f"{org}/{name}" if org else name
        repo_type = body.get("type") or "model"
        private = body.get("visibility") == "private" or bool(body.get("private"))
        hub = self.hub
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{hub.url}/{prefix}{repo_id}"
        with hub._lock:
            if (repo_type, repo_id) in hub._repos:
                # Like the Hub, a 409 still carries the repo URL (create_repo(exist_ok=True) reads it).
                msg = f"You already created this {repo_type} repo"
                return self._send_json({"error": msg, "url": url}, 409, {"X-Error-Message": msg})
            hub.create_repo(repo_id, repo_type=repo_type, private=private)
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _preupload(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._json_body()
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            sha = repo.resolve(revision)
            existing = dict(repo.commits[sha].files) if sha is not None else {}
        out = []
        for f in body.get("files", []):
            path, size = f["path"], int(f["size"])
            mode = "lfs" if hub.lfs_uploads and size > 0 and is_lfs_path(path, size) else "regular"
            blob = existing.get(path)
            oid = None if blob is None else (blob.sha256 if mode == "lfs" else blob.git_sha1)
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send_json({"files": out, "commitOid": sha})

    def _commit(self, repo_type: str, repo_id: str, revision: str) -> None:
        if _truthy(self._query.get("create_pr")):
            raise _HTTPError(400, "create_pr is not supported by the test hub")
        lines = [json.loads(line) for line in self._read_body().splitlines() if line.strip()]
        header: dict[str, Any] = {}
        changes: dict[str, bytes | None] = {}
        blobs: dict[str, _Blob] = {}
        deleted_folders: list[str] = []
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            if revision not in repo.branches:
                raise _HTTPError(404, f"Invalid rev id: {revision} (not a branch)", "RevisionNotFound")
            head = repo.branches[revision]
            current = repo.commits[head].files
            for item in lines:
                key, value = item.get("key"), item.get("value") or {}
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _HTTPError(400, f"unsupported encoding {value.get('encoding')!r}")
                    changes[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    obj = hub._lfs_objects.get(value["oid"])
                    if obj is None:
                        raise _HTTPError(400, f"LFS object {value['oid']} was never uploaded ({value['path']})")
                    blobs[value["path"]] = obj
                elif key == "deletedFile":
                    if value["path"] not in current:
                        raise _HTTPError(
                            404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound"
                        )
                    changes[value["path"]] = None
                elif key == "deletedFolder":
                    deleted_folders.append(value["path"])
                else:
                    raise _HTTPError(400, f"unknown commit operation {key!r}")
            parent_commit = header.get("parentCommit")
            if parent_commit is not None and parent_commit != head:
                raise _HTTPError(412, f"parentCommit {parent_commit} is not the head of {revision} ({head})")
            sha = hub._new_commit(
                repo,
                revision,
                changes,
                header.get("summary") or "commit",
                deleted_folders=deleted_folders,
                blobs=blobs,
            )
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{hub.url}/{prefix}{repo_id}/commit/{sha}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _branch(self, method: str, repo_type: str, repo_id: str, name: str) -> None:
        body = self._json_body() if method == "POST" else {}
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            if method == "DELETE":
                if name not in repo.branches:
                    raise _HTTPError(404, f"branch {name} not found", "RevisionNotFound")
                if name == "main":
                    raise _HTTPError(403, "cannot delete main")
                del repo.branches[name]
            else:
                if name in repo.branches:
                    raise _HTTPError(409, f"Reference already exists: refs/heads/{name}")
                repo.branches[name] = hub._resolve_or_raise(repo, body.get("startingPoint") or "main")
        self._send_json({})

    def _tag(self, repo_type: str, repo_id: str, revision: str) -> None:
        body = self._json_body()
        hub = self.hub
        with hub._lock:
            repo = hub._get_repo(repo_type, repo_id)
            tag = body.get("tag")
            if not isinstance(tag, str) or not tag:
                raise _HTTPError(400, "missing tag")
            if tag in repo.tags:
                raise _HTTPError(409, f"Reference already exists: refs/tags/{tag}")
            repo.tags[tag] = hub._resolve_or_raise(repo, revision)
        self._send_json({})

    # -------------------------------------------------------------- LFS (basic transfer)

    def _lfs_batch(self, repo_type: str, repo_id: str) -> None:
        body = self._json_body()
        hub = self.hub
        with hub._lock:
            hub._get_repo(repo_type, repo_id)
            if body.get("operation") != "upload":
                raise _HTTPError(400, "only the upload operation is implemented")
            objects = []
            for obj in body.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
                if oid not in hub._lfs_objects:
                    entry["actions"] = {
                        "upload": {"href": f"{hub.url}/_lfs/objects/{oid}"},
                        "verify": {"href": f"{hub.url}/_lfs/verify"},
                    }
                objects.append(entry)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def _route_lfs_storage(self, method: str, segs: list[str]) -> None:
        hub = self.hub
        if method == "PUT" and len(segs) == 2 and segs[0] == "objects":
            oid = segs[1]
            blob = _Blob.of(self._read_body())
            if blob.sha256 != oid:
                raise _HTTPError(400, f"uploaded content has sha256 {blob.sha256}, expected {oid}")
            with hub._lock:
                hub._lfs_objects[oid] = blob
            return self._send(200, b"", {"ETag": f'"{oid}"'})
        if method == "POST" and segs == ["verify"]:
            body = self._json_body()
            with hub._lock:
                blob = hub._lfs_objects.get(body.get("oid", ""))
            if blob is None or len(blob.data) != int(body.get("size", -1)):
                raise _HTTPError(404, f"LFS object {body.get('oid')} not found or wrong size")
            return self._send_json({})
        raise _HTTPError(404, f"no route for {method} {self._url_path}")


def _truthy(values: list[str] | None) -> bool:
    """Query flag as sent by ``httpx`` (``true``/``True``/``1``)."""
    return bool(values) and values[0].lower() in ("1", "true", "yes")
