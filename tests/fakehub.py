"""A local fake Hugging Face Hub for tests: a real HTTP server in a thread.

It implements the part of the Hub protocol that huggingface_hub 2.4 uses to
inspect and download model repos (shared/notes/hub.md, section 3):

    GET  /api/models/{ns}/{name}[/revision/{rev}][?blobs=true]
    GET  /api/models/{ns}/{name}/tree/{rev}[/{path}][?recursive=true]
    GET  /api/models/{ns}/{name}/refs
    POST /api/models/{ns}/{name}/paths-info/{rev}
    HEAD /{ns}/{name}/resolve/{rev}/{path}
    GET  /{ns}/{name}/resolve/{rev}/{path}       (Range requests honoured)

Repos live in memory and are built with `commit()`, `tag()` and `branch()`.
The server never emits Xet fields or headers, so the client always downloads
over plain HTTP. It can misbehave on request (wrong bytes, cut connections,
slow links, blanket failures) so that tests can exercise a client's error handling.

    with FakeHub() as hub:
        sha = hub.commit("org/model", {"config.json": b"{}"})
        # point HF_ENDPOINT (or endpoint=) at hub.url
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import socket
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import NamedTuple

# Files stored through LFS unless `commit(lfs=...)` says otherwise: the usual
# .gitattributes patterns of model repos plus the Hub's large-file rule.
DEFAULT_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
DEFAULT_LFS_MIN_SIZE = 10 * 1024

DEFAULT_BRANCH = "main"
DEFAULT_PAGE_SIZE = 1000  # what the real Hub uses for tree listings

# Commit timestamps derive from a counter so that runs are reproducible.
_EPOCH = datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)


def git_blob_sha1(data: bytes) -> str:
    """The git object id of `data` stored as a blob."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(data: bytes) -> bytes:
    """The LFS pointer file that git stores in place of `data`."""
    digest = hashlib.sha256(data).hexdigest()
    return (
        "version https://git-lfs.github.com/spec/v1\n"
        f"oid sha256:{digest}\nsize {len(data)}\n"
    ).encode()


def is_lfs_by_default(path: str, data: bytes) -> bool:
    return path.endswith(DEFAULT_LFS_SUFFIXES) or len(data) > DEFAULT_LFS_MIN_SIZE


@dataclass(frozen=True)
class StoredFile:
    """One file's content plus the identifiers the Hub derives from it."""

    data: bytes
    is_lfs: bool
    sha256: str
    git_oid: str  # sha1 of the blob git stores: the pointer, for LFS files
    pointer_size: int

    @classmethod
    def create(cls, data: bytes, is_lfs: bool) -> StoredFile:
        pointer = lfs_pointer(data)
        return cls(
            data=data,
            is_lfs=is_lfs,
            sha256=hashlib.sha256(data).hexdigest(),
            git_oid=git_blob_sha1(pointer if is_lfs else data),
            pointer_size=len(pointer),
        )

    @property
    def etag(self) -> str:
        return self.sha256 if self.is_lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    sha: str
    files: dict[str, StoredFile]  # never mutated once the commit exists
    timestamp: str

    def folders(self) -> set[str]:
        """Every folder implied by the file paths, the root ("") excluded."""
        found = set()
        for path in self.files:
            folder = _parent(path)
            while folder:
                found.add(folder)
                folder = _parent(folder)
        return found


@dataclass
class Repo:
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(sha)


def _parent(path: str) -> str:
    return path.rpartition("/")[0]


class LoggedRequest(NamedTuple):
    method: str
    path: str  # as sent: percent-encoded, with the query
    headers: dict[str, str]


@dataclass(frozen=True)
class Request:
    method: str
    target: str  # as sent: percent-encoded, with the query
    path: str  # percent-encoded, without the query
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    range_header: str | None


class Response(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    # Set to cut the connection after this many body bytes.
    cut_after: int | None = None
    # Set to send the body at this many bytes per second.
    rate: int | None = None


class HubError(Exception):
    """An error answer: a JSON body plus the headers the client maps to exceptions."""

    def __init__(self, status: int, code: str | None, message: str, commit: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.commit = commit

    def response(self) -> Response:
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            # Header values must be latin-1 on one line; file names may be neither.
            "X-Error-Message": self.message.encode("unicode_escape").decode("ascii"),
        }
        if self.code:
            headers["X-Error-Code"] = self.code
        if self.commit:
            headers["X-Repo-Commit"] = self.commit
        return Response(self.status, headers, json.dumps({"error": self.message}).encode())


class FakeHub:
    """In-memory model repos served over HTTP on 127.0.0.1."""

    def __init__(self, page_size: int = DEFAULT_PAGE_SIZE):
        # Tree listings longer than this are split into pages linked by rel="next".
        self.page_size = page_size
        self._lock = threading.Lock()
        self._repos: dict[str, Repo] = {}
        self._commit_counter = 0
        self._request_log: list[LoggedRequest] = []
        self._wrong_bytes: set[tuple[str, str]] = set()
        self._cuts: dict[tuple[str, str], tuple[int, int]] = {}  # -> (after_bytes, times left)
        self._rates: dict[tuple[str, str], int] = {}  # -> bytes per second
        self._fail_status: int | None = None
        self._gated: dict[str, str] = {}  # repo id → the token it needs
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> FakeHub:
        if self._server is not None:
            raise RuntimeError("FakeHub is already running")
        self._server = _Server(self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            # The default 0.5 s poll would make every stop() that slow.
            kwargs={"poll_interval": 0.02},
            name="fakehub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        # Otherwise clients holding pooled keep-alive connections would still
        # be answered by their handler threads after the hub "stopped".
        self._server.close_open_connections()
        self._server.server_close()
        self._thread.join()
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakeHub is not running")
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # -- building repos ----------------------------------------------------

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes | None],
        *,
        branch: str = DEFAULT_BRANCH,
        lfs: set[str] | None = None,
        parent: bool | str = True,
    ) -> str:
        """Add a commit on `branch` (created if needed) and return its sha.

        The new tree is the parent's tree with `files` applied; a value of None
        deletes that path. `parent` is True for the branch's current head, False
        for an empty tree, or a commit sha. `lfs`, when given, is the exact set of
        paths in `files` stored through LFS; otherwise the default rule applies.
        Paths are not validated: hostile names are stored and listed verbatim.
        """
        if repo_id.count("/") != 1:
            raise ValueError(f"repo_id must be 'namespace/name', not {repo_id!r}")
        with self._lock:
            repo = self._repos.setdefault(repo_id, Repo())
            if parent is True:
                parent_sha = repo.branches.get(branch)
            elif parent is False:
                parent_sha = None
            elif parent in repo.commits:
                parent_sha = parent
            else:
                raise KeyError(f"{repo_id} has no commit {parent}")
            tree = dict(repo.commits[parent_sha].files) if parent_sha else {}
            for path, data in files.items():
                if data is None:
                    tree.pop(path, None)
                else:
                    is_lfs = path in lfs if lfs is not None else is_lfs_by_default(path, data)
                    tree[path] = StoredFile.create(data, is_lfs)

            # The counter makes every commit unique, even one changing nothing.
            self._commit_counter += 1
            digest = hashlib.sha1(f"{self._commit_counter}\0{parent_sha}\0".encode())
            for path in sorted(tree):
                digest.update(f"{path}\0{tree[path].git_oid}\0".encode())
            moment = _EPOCH + datetime.timedelta(minutes=self._commit_counter)
            new_commit = Commit(
                sha=digest.hexdigest(),
                files=tree,
                timestamp=moment.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
            )
            repo.commits[new_commit.sha] = new_commit
            repo.branches[branch] = new_commit.sha
            return new_commit.sha

    def tag(self, repo_id: str, tag: str, sha: str) -> None:
        with self._lock:
            self._repo_with_commit(repo_id, sha).tags[tag] = sha

    def branch(self, repo_id: str, name: str, sha: str) -> None:
        with self._lock:
            self._repo_with_commit(repo_id, sha).branches[name] = sha

    def _repo_with_commit(self, repo_id: str, sha: str) -> Repo:
        repo = self._repos.get(repo_id)
        if repo is None or sha not in repo.commits:
            raise KeyError(f"{repo_id} has no commit {sha}")
        return repo

    # -- request log -------------------------------------------------------

    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path with query) of every request received, oldest first."""
        with self._lock:
            return [(logged.method, logged.path) for logged in self._request_log]

    @property
    def logged_requests(self) -> list[LoggedRequest]:
        """Like `requests`, plus each request's headers (to check Range, say)."""
        with self._lock:
            return list(self._request_log)

    def ranges_asked(self, repo_id: str, path: str) -> list[str | None]:
        """The Range header of each GET of this file (None: the whole file), oldest first."""
        prefix = f"/{urllib.parse.quote(repo_id)}/resolve/"
        suffix = "/" + urllib.parse.quote(path)
        with self._lock:
            return [
                logged.headers.get("Range") for logged in self._request_log
                if logged.method == "GET" and logged.path.startswith(prefix) and logged.path.endswith(suffix)
            ]

    def clear_requests(self) -> None:
        with self._lock:
            self._request_log.clear()

    # -- misbehaviour ------------------------------------------------------

    def serve_wrong_bytes(self, repo_id: str, path: str) -> None:
        """GETs of this file (at any revision) return same-size, different bytes.

        The headers still announce the true ETag and size.
        """
        with self._lock:
            self._wrong_bytes.add((repo_id, path))

    def cut_connection(self, repo_id: str, path: str, after_bytes: int, times: int = 1) -> None:
        """The next `times` GETs of this file announce the full Content-Length
        but close the connection after `after_bytes` body bytes."""
        with self._lock:
            self._cuts[(repo_id, path)] = (after_bytes, times)

    def throttle(self, repo_id: str, path: str, bytes_per_second: int) -> None:
        """GETs of this file send its bytes slowly, at about `bytes_per_second`, as a slow link does."""
        with self._lock:
            self._rates[(repo_id, path)] = bytes_per_second

    def fail_all(self, status: int | None = 500) -> None:
        """Answer every request with `status`; None restores normal service."""
        with self._lock:
            self._fail_status = status

    def gate(self, repo_id: str, token: str) -> None:
        """Make repo_id gated: every request for it needs `Authorization: Bearer <token>`."""
        with self._lock:
            self._gated[repo_id] = token

    def reset_faults(self) -> None:
        """Undo serve_wrong_bytes, cut_connection, throttle and fail_all."""
        with self._lock:
            self._wrong_bytes.clear()
            self._cuts.clear()
            self._rates.clear()
            self._fail_status = None

    # -- request handling (called from server threads) ----------------------

    def _handle(self, request: Request, headers: dict[str, str]) -> Response:
        # One lock for everything, so a test changing the hub never races a
        # request. The response is written after the lock is released.
        with self._lock:
            self._request_log.append(LoggedRequest(request.method, request.target, headers))
            try:
                self._check_gate(request, headers)
                return self._route(request)
            except HubError as error:
                return error.response()

    def _check_gate(self, request: Request, headers: dict[str, str]) -> None:
        segments = [urllib.parse.unquote(s) for s in request.path.split("/")[1:]]
        names = segments[2:4] if segments[:2] == ["api", "models"] else segments[:2]
        token = self._gated.get("/".join(names))
        authorization = {k.lower(): v for k, v in headers.items()}.get("authorization")
        if token is not None and authorization != f"Bearer {token}":
            raise HubError(401, "GatedRepo", f"Access to model {'/'.join(names)} is restricted")

    def _route(self, request: Request) -> Response:
        if self._fail_status is not None:
            raise HubError(self._fail_status, None, "FakeHub is failing all requests")
        # Split before unquoting: the client sends a revision such as
        # refs/pr/1 as the single segment refs%2Fpr%2F1.
        segments = [urllib.parse.unquote(s) for s in request.path.split("/")[1:]]
        if segments[:2] == ["api", "models"] and len(segments) >= 4:
            return self._route_api(request, segments[2:])
        if len(segments) >= 5 and segments[2] == "resolve" and request.method in ("GET", "HEAD"):
            repo_id = f"{segments[0]}/{segments[1]}"
            return self._resolve_file(request, repo_id, segments[3], "/".join(segments[4:]))
        # Includes GET /api/agent-harnesses, the client's agent-detection probe.
        raise HubError(404, None, "Not Found")

    def _route_api(self, request: Request, segments: list[str]) -> Response:
        repo_id = f"{segments[0]}/{segments[1]}"
        action, args = (segments[2], segments[3:]) if len(segments) > 2 else (None, [])
        if request.method in ("GET", "HEAD"):
            if action is None:
                return _json(self._model_info(repo_id, DEFAULT_BRANCH, request.query))
            if action == "revision" and args:
                return _json(self._model_info(repo_id, "/".join(args), request.query))
            if action == "tree" and args:
                return self._tree(request, repo_id, args[0], "/".join(args[1:]))
            if action == "refs" and not args:
                return _json(self._refs(repo_id))
        if request.method == "POST" and action == "paths-info" and args:
            commit = self._commit_for(repo_id, "/".join(args))
            return _json(_entries(commit, request.form.get("paths", [])))
        raise HubError(404, None, "Not Found")

    def _commit_for(self, repo_id: str, revision: str) -> Commit:
        repo = self._repos.get(repo_id)
        if repo is None:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        found = repo.resolve(revision)
        if found is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return found

    def _model_info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> dict:
        commit = self._commit_for(repo_id, revision)
        with_blobs = _flag(query, "blobs")
        siblings = []
        for path in sorted(commit.files):
            sibling = {"rfilename": path}
            if with_blobs:
                stored = commit.files[path]
                sibling.update(size=len(stored.data), blobId=stored.git_oid)
                if stored.is_lfs:
                    # Note: "sha256" here, but "oid" in tree entries, as on the Hub.
                    sibling["lfs"] = {
                        "sha256": stored.sha256,
                        "size": len(stored.data),
                        "pointerSize": stored.pointer_size,
                    }
            siblings.append(sibling)
        return {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "sha": commit.sha,
            "lastModified": commit.timestamp,
            "private": False,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": siblings,
        }

    def _tree(self, request: Request, repo_id: str, revision: str, folder: str) -> Response:
        commit = self._commit_for(repo_id, revision)
        folders = commit.folders()
        if folder and folder not in folders:
            raise HubError(404, "EntryNotFound", f"{folder} does not exist on {revision}", commit.sha)
        every_path = sorted(folders | set(commit.files))
        if _flag(request.query, "recursive"):
            chosen = [p for p in every_path if not folder or p.startswith(folder + "/")]
        else:
            chosen = [p for p in every_path if _parent(p) == folder]
        entries = _entries(commit, chosen)

        start = int(request.query.get("cursor", ["0"])[0])
        response = _json(entries[start : start + self.page_size])
        if start + self.page_size < len(entries):
            next_query = {**request.query, "cursor": [str(start + self.page_size)]}
            next_url = self.url + _with_query(request.path, next_query)
            response.headers["Link"] = f'<{next_url}>; rel="next"'
        return response

    def _refs(self, repo_id: str) -> dict:
        if repo_id not in self._repos:
            raise HubError(404, "RepoNotFound", f"Repository not found: {repo_id}")
        repo = self._repos[repo_id]

        def describe(names: dict[str, str], kind: str) -> list[dict]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": sha}
                for name, sha in sorted(names.items())
            ]

        return {
            "branches": describe(repo.branches, "heads"),
            "tags": describe(repo.tags, "tags"),
            "converts": [],
            "pullRequests": [],
        }

    def _resolve_file(self, request: Request, repo_id: str, revision: str, path: str) -> Response:
        commit = self._commit_for(repo_id, revision)
        stored = commit.files.get(path)
        if stored is None:
            # X-Repo-Commit lets the client record the miss under .no_exist/<sha>/.
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}", commit.sha)
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{stored.etag}"',
        }
        if stored.is_lfs:
            headers["X-Linked-Etag"] = f'"{stored.sha256}"'
            headers["X-Linked-Size"] = str(len(stored.data))
        if request.method == "HEAD":
            return Response(200, headers, stored.data)

        data = stored.data
        if (repo_id, path) in self._wrong_bytes:
            data = bytes(byte ^ 0x5A for byte in data)  # changes every byte
        status = 200
        try:
            byte_range = _parse_range(request.range_header, len(data))
        except RangeNotSatisfiable:
            return Response(416, {"Content-Range": f"bytes */{len(data)}"}, b"")
        if byte_range is not None:
            start, stop = byte_range
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            data = data[start:stop]
        return Response(status, headers, data, self._take_cut((repo_id, path)), self._rates.get((repo_id, path)))

    def _take_cut(self, key: tuple[str, str]) -> int | None:
        after_bytes, times_left = self._cuts.get(key, (0, 0))
        if times_left <= 0:
            return None
        self._cuts[key] = (after_bytes, times_left - 1)
        return after_bytes


def _entries(commit: Commit, paths: list[str]) -> list[dict]:
    """Tree-style entries for those of `paths` that exist, in the given order."""
    folders = commit.folders()
    entries = []
    for path in paths:
        stored = commit.files.get(path)
        if stored is not None:
            entry = {"type": "file", "oid": stored.git_oid, "size": len(stored.data), "path": path}
            if stored.is_lfs:
                entry["lfs"] = {
                    "oid": stored.sha256,
                    "size": len(stored.data),
                    "pointerSize": stored.pointer_size,
                }
            entries.append(entry)
        elif path in folders:
            entries.append({"type": "directory", "oid": _folder_oid(commit, path), "size": 0, "path": path})
    return entries


def _folder_oid(commit: Commit, folder: str) -> str:
    """A stable id for a folder's content (not a real git tree hash)."""
    digest = hashlib.sha1(b"tree\0")
    prefix = folder + "/"
    for path in sorted(commit.files):
        if path.startswith(prefix):
            # Relative paths, so that a folder holding only one subfolder
            # still differs from that subfolder, as in git.
            relative = path[len(prefix) :]
            digest.update(f"{relative}\0{commit.files[path].git_oid}\0".encode())
    return digest.hexdigest()


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1].lower() in ("true", "1")


def _with_query(path: str, query: dict[str, list[str]]) -> str:
    return f"{path}?{urllib.parse.urlencode(query, doseq=True)}" if query else path


def _json(payload) -> Response:
    return Response(200, {"Content-Type": "application/json; charset=utf-8"}, json.dumps(payload).encode())


class RangeNotSatisfiable(Exception):
    pass


def _parse_range(header: str | None, total: int) -> tuple[int, int] | None:
    """The [start, stop) slice a Range header asks for, or None to send it all.

    Headers we do not understand (several ranges, other units, malformed) are
    ignored, as RFC 9110 allows; ranges outside the content raise
    RangeNotSatisfiable.
    """
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":
        suffix_length = int(last)
        if suffix_length == 0 or total == 0:
            raise RangeNotSatisfiable
        return max(0, total - suffix_length), total
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= total:
        raise RangeNotSatisfiable
    stop = min(int(last) + 1, total) if last else total
    return start, stop


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub):
        self.hub = hub
        self._open_connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self):
        connection, address = super().get_request()
        with self._connections_lock:
            self._open_connections.add(connection)
        return connection, address

    def shutdown_request(self, request):
        with self._connections_lock:
            self._open_connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        # A client that hangs up mid-request (a killed fetch, a cut test) is routine here;
        # anything else is still printed.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)

    def close_open_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._open_connections)
        for connection in connections:
            try:
                # shutdown, not close: it wakes the handler thread blocked in
                # recv, which then closes the socket itself.
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's pool expects
    timeout = 30  # so idle keep-alive connections do not hold threads forever

    server: _Server

    def do_GET(self):
        self._respond("GET")

    def do_HEAD(self):
        self._respond("HEAD")

    def do_POST(self):
        self._respond("POST")

    def log_message(self, format, *args):
        pass  # keep test output clean: the hub keeps its own request log

    def _respond(self, method: str) -> None:
        # Always drain a request body so the keep-alive stream stays in step.
        length = int(self.headers.get("Content-Length") or 0)
        raw_body = self.rfile.read(length) if length else b""
        raw_path, _, raw_query = self.path.partition("?")
        request = Request(
            method=method,
            target=self.path,
            path=raw_path,
            query=urllib.parse.parse_qs(raw_query),
            form=urllib.parse.parse_qs(raw_body.decode("utf-8", "replace")),
            range_header=self.headers.get("Range"),
        )
        response = self.server.hub._handle(request, dict(self.headers.items()))

        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if method == "HEAD":
            return
        if response.rate is not None:
            self._write_slowly(response.body[: response.cut_after], response.rate)
            self.close_connection = response.cut_after is not None
            return
        if response.cut_after is None:
            self.wfile.write(response.body)
            return
        # Promise the whole body, deliver part of it, then hang up: the client
        # sees the message body end early.
        self.wfile.write(response.body[: response.cut_after])
        self.close_connection = True

    def _write_slowly(self, body: bytes, rate: int) -> None:
        """Write body in twentieths of a second's worth, pausing between them."""
        step = max(1, rate // 20)
        for start in range(0, len(body), step):
            self.wfile.write(body[start : start + step])
            self.wfile.flush()
            time.sleep(0.05)
