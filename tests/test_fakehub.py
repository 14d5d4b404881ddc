"""Tests that the fake Hub (tests/fakehub.py) speaks the protocol the real
huggingface_hub 2.4 client expects, and documents how that client reacts to
the fake's misbehaviours.

The client runs in a subprocess: huggingface_hub reads HF_ENDPOINT and its
other settings once, at import, and some requests (the agent-detection
probe) go to that endpoint whatever `endpoint=` says. A fresh interpreter
per test guarantees every request goes to the fake and nowhere else.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from fakehub import FakeHub, git_blob_sha1, lfs_pointer

REPO = "org/model"
CONFIG = b'{"architectures": ["TinyModel"]}'
WEIGHTS = bytes(range(256)) * 64  # 16 KiB, LFS by its suffix
TOKENIZER = b'{"vocab": {}}' + b" " * 20_000  # LFS by its size (> 10 KB)
NESTED = b"nested\n"
TEN_MIB = 10 * 1024 * 1024  # the client's download chunk size

# Runs before each client script: `api` and the usual functions are in scope.
PRELUDE = """
import hashlib, json, sys, time
from pathlib import Path
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub import errors
api = HfApi()
"""


@pytest.fixture
def hub():
    with FakeHub() as running_hub:
        yield running_hub


@pytest.fixture
def repo_sha(hub) -> str:
    """A repo with LFS and plain files in nested folders."""
    return hub.commit(
        REPO,
        {
            "config.json": CONFIG,
            "model.safetensors": WEIGHTS,
            "tokenizer.json": TOKENIZER,
            "sub/dir/extra.txt": NESTED,
        },
    )


def client_env(hub: FakeHub, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HOME=str(home),
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
    )
    return env


def run_client(hub: FakeHub, tmp_path: Path, script: str, *, skip_retry_sleep: bool = False):
    """Run `script` with the real client against `hub`; return its `result`.

    The script must assign a JSON-serialisable `result`. With
    `skip_retry_sleep`, the client's 1 s pause before each download retry is
    removed so that retry tests stay fast.
    """
    code = PRELUDE
    if skip_retry_sleep:
        code += "time.sleep = lambda seconds: None\n"
    code += textwrap.dedent(script) + "\nprint(json.dumps(result))\n"
    completed = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "cache")],
        env=client_env(hub, tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_model_info_resolves_branches_tags_and_shas(hub, tmp_path, repo_sha):
    head_sha = hub.commit(REPO, {"config.json": b"{}"})
    hub.tag(REPO, "v1", repo_sha)
    hub.branch(REPO, "feature/x", repo_sha)  # "/" travels as %2F

    result = run_client(
        hub,
        tmp_path,
        """
        revisions = [None, "main", "v1", "feature/x", "%s"]
        shas = [api.model_info("org/model", revision=r).sha for r in revisions]
        info = api.model_info("org/model", revision="v1", files_metadata=True)
        siblings = {
            s.rfilename: [s.size, s.blob_id, s.lfs and s.lfs.sha256, s.lfs and s.lfs.size]
            for s in info.siblings
        }
        refs = api.list_repo_refs("org/model")
        result = {
            "shas": shas,
            "siblings": siblings,
            "branches": sorted((b.name, b.target_commit) for b in refs.branches),
            "tags": [(t.name, t.target_commit) for t in refs.tags],
        }
        """
        % repo_sha,
    )

    assert result["shas"] == [head_sha, head_sha, repo_sha, repo_sha, repo_sha]
    assert result["siblings"] == {
        "config.json": [len(CONFIG), git_blob_sha1(CONFIG), None, None],
        "model.safetensors": [len(WEIGHTS), git_blob_sha1(lfs_pointer(WEIGHTS)), sha256(WEIGHTS), len(WEIGHTS)],
        "tokenizer.json": [len(TOKENIZER), git_blob_sha1(lfs_pointer(TOKENIZER)), sha256(TOKENIZER), len(TOKENIZER)],
        "sub/dir/extra.txt": [len(NESTED), git_blob_sha1(NESTED), None, None],
    }
    assert result["branches"] == [["feature/x", repo_sha], ["main", head_sha]]
    assert result["tags"] == [["v1", repo_sha]]
    assert ("GET", "/api/models/org/model/revision/feature%2Fx") in hub.requests
    assert ("GET", "/api/models/org/model/revision/v1?blobs=true") in hub.requests


def test_list_repo_tree_gives_paths_sizes_and_lfs_hashes(hub, tmp_path, repo_sha):
    hostile = {"../evil": b"1", "/abs": b"2", "a\\b": b"3"}
    sha = hub.commit(REPO, hostile)

    result = run_client(
        hub,
        tmp_path,
        """
        entries = api.list_repo_tree("org/model", revision="%s", recursive=True)
        result = [
            [type(e).__name__, e.path, getattr(e, "size", None), getattr(e, "blob_id", None),
             e.lfs.sha256 if getattr(e, "lfs", None) else None]
            for e in entries
        ]
        """
        % sha,
    )

    files = {path: [size, oid, lfs] for kind, path, size, oid, lfs in result if kind == "RepoFile"}
    folders = {path for kind, path, *_ in result if kind == "RepoFolder"}
    assert folders == {"sub", "sub/dir", ".."}
    assert files["config.json"] == [len(CONFIG), git_blob_sha1(CONFIG), None]
    assert files["sub/dir/extra.txt"] == [len(NESTED), git_blob_sha1(NESTED), None]
    # The pointer text spelled out here, to check lfs_pointer() as well.
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(WEIGHTS)}\nsize {len(WEIGHTS)}\n"
    assert files["model.safetensors"] == [len(WEIGHTS), git_blob_sha1(pointer.encode()), sha256(WEIGHTS)]
    assert files["tokenizer.json"][2] == sha256(TOKENIZER)
    for name, data in hostile.items():
        assert files[name] == [len(data), git_blob_sha1(data), None]


def test_tree_listing_is_paginated(hub, tmp_path, repo_sha):
    hub.page_size = 2

    result = run_client(
        hub,
        tmp_path,
        """
        result = sorted(e.path for e in api.list_repo_tree("org/model", recursive=True))
        """,
    )

    assert result == sorted(
        ["config.json", "model.safetensors", "tokenizer.json", "sub", "sub/dir", "sub/dir/extra.txt"]
    )
    tree_requests = [path for method, path in hub.requests if "/tree/" in path]
    assert len(tree_requests) == 3  # six entries, two per page
    assert "cursor=4" in tree_requests[-1]


def test_snapshot_download_stores_exact_bytes_under_hub_blob_names(hub, tmp_path, repo_sha):
    result = run_client(
        hub,
        tmp_path,
        """
        folder = Path(snapshot_download("org/model", cache_dir=sys.argv[1]))
        result = {
            "snapshot": str(folder),
            "files": {
                str(p.relative_to(folder)): [p.read_bytes().hex(), p.resolve().name]
                for p in folder.rglob("*") if p.is_file()
            },
        }
        """,
    )

    assert Path(result["snapshot"]).name == repo_sha
    expected = {
        "config.json": [CONFIG, git_blob_sha1(CONFIG)],
        "model.safetensors": [WEIGHTS, sha256(WEIGHTS)],
        "tokenizer.json": [TOKENIZER, sha256(TOKENIZER)],
        "sub/dir/extra.txt": [NESTED, git_blob_sha1(NESTED)],
    }
    assert result["files"] == {path: [data.hex(), blob] for path, (data, blob) in expected.items()}
    assert ("GET", f"/api/models/org/model/tree/{repo_sha}?recursive=true&expand=false") in hub.requests
    assert ("HEAD", f"/org/model/resolve/{repo_sha}/sub/dir/extra.txt") in hub.requests


def test_missing_repo_revision_and_file_raise_the_matching_errors(hub, tmp_path, repo_sha):
    result = run_client(
        hub,
        tmp_path,
        """
        attempts = {
            "repo": lambda: api.model_info("org/missing"),
            "revision": lambda: api.model_info("org/model", revision="no-such-branch"),
            "tree revision": lambda: api.list_repo_tree("org/model", revision="0" * 40).__next__(),
            "file": lambda: hf_hub_download("org/model", "nope.json", cache_dir=sys.argv[1]),
        }
        result = {}
        for name, attempt in attempts.items():
            try:
                attempt()
                result[name] = None
            except Exception as error:
                result[name] = type(error).__name__
        """,
    )

    assert result == {
        "repo": "RepositoryNotFoundError",
        "revision": "RevisionNotFoundError",
        "tree revision": "RevisionNotFoundError",
        "file": "RemoteEntryNotFoundError",
    }
    # The 404 carries X-Repo-Commit, so the client caches the miss.
    no_exist = tmp_path / "cache" / "models--org--model" / ".no_exist" / repo_sha / "nope.json"
    assert no_exist.exists()


def test_wrong_bytes_are_accepted_because_only_the_size_is_checked(hub, tmp_path, repo_sha):
    hub.serve_wrong_bytes(REPO, "model.safetensors")

    result = run_client(
        hub,
        tmp_path,
        """
        path = Path(hf_hub_download("org/model", "model.safetensors", cache_dir=sys.argv[1]))
        result = [path.read_bytes().hex(), path.resolve().name]
        """,
    )

    served = bytes.fromhex(result[0])
    assert len(served) == len(WEIGHTS) and served != WEIGHTS
    assert result[1] == sha256(WEIGHTS)  # stored under the good hash all the same


def test_cut_connection_is_resumed_with_a_range_request(hub, tmp_path):
    weights = os.urandom(TEN_MIB + TEN_MIB // 2)
    hub.commit(REPO, {"model.safetensors": weights})
    hub.cut_connection(REPO, "model.safetensors", after_bytes=TEN_MIB + 1000)

    result = run_client(
        hub,
        tmp_path,
        """
        path = hf_hub_download("org/model", "model.safetensors", cache_dir=sys.argv[1])
        result = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        """,
        skip_retry_sleep=True,
    )

    assert result == sha256(weights)
    gets = [logged for logged in hub.logged_requests if logged.method == "GET"]
    # Only whole 10 MiB chunks reach the disk, so the resume starts there.
    assert [logged.headers.get("Range") for logged in gets] == [None, f"bytes={TEN_MIB}-"]


def test_repeated_cuts_fail_after_five_retries_and_clean_up(hub, tmp_path, repo_sha):
    hub.cut_connection(REPO, "config.json", after_bytes=5, times=6)

    result = run_client(
        hub,
        tmp_path,
        """
        try:
            hf_hub_download("org/model", "config.json", cache_dir=sys.argv[1])
            first = None
        except Exception as error:
            first = type(error).__module__ + "." + type(error).__name__
        # The cuts are used up: the same call now succeeds.
        second = Path(hf_hub_download("org/model", "config.json", cache_dir=sys.argv[1])).read_bytes()
        result = [first, second.decode()]
        """,
        skip_retry_sleep=True,
    )

    # No progress was made, so there was no Range header and the client gave
    # up after 1 + 5 attempts, raising the raw httpx2 error (not an HfHubHTTPError).
    assert result == ["httpx2.RemoteProtocolError", CONFIG.decode()]
    gets = [logged for logged in hub.logged_requests if logged.method == "GET"]
    assert len(gets) == 7
    assert all("Range" not in logged.headers for logged in gets)
    assert not list((tmp_path / "cache").rglob("*.incomplete"))


def test_killed_download_leaves_an_incomplete_file_that_is_never_resumed(hub, tmp_path):
    weights = os.urandom(TEN_MIB + TEN_MIB // 2)
    hub.commit(REPO, {"model.safetensors": weights})
    # Every attempt is cut, so the first process sits in its retry pause with
    # 10 MiB on disk until we kill it.
    hub.cut_connection(REPO, "model.safetensors", after_bytes=TEN_MIB + 1000, times=100)
    download = PRELUDE + "hf_hub_download('org/model', 'model.safetensors', cache_dir=sys.argv[1])\n"
    cache = tmp_path / "cache"
    process = subprocess.Popen(
        [sys.executable, "-c", download, str(cache)],
        env=client_env(hub, tmp_path / "home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not [p for p in cache.rglob("*.incomplete") if p.stat().st_size >= TEN_MIB]:
            assert time.monotonic() < deadline, "the download never wrote its first chunk"
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    leftover = list(cache.rglob("*.incomplete"))
    # The temporary name is unique per process: <sha256>.<8 hex>.incomplete.
    assert len(leftover) == 1 and leftover[0].name.startswith(sha256(weights) + ".")

    hub.reset_faults()
    hub.clear_requests()
    result = run_client(
        hub,
        tmp_path,
        """
        path = hf_hub_download("org/model", "model.safetensors", cache_dir=sys.argv[1])
        result = Path(path).stat().st_size
        """,
    )

    assert result == len(weights)
    gets = [logged for logged in hub.logged_requests if logged.method == "GET"]
    assert [logged.headers.get("Range") for logged in gets] == [None]
    assert list(cache.rglob("*.incomplete")) == leftover  # stale, and left there


class TestRawHttp:
    """Protocol details checked without the client, over one keep-alive connection."""

    @pytest.fixture
    def connection(self, hub):
        port = int(hub.url.rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        yield connection
        connection.close()

    @staticmethod
    def fetch(connection, method, path, headers=None, body=None):
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response, response.read()

    def test_resolve_headers_and_ranges(self, hub, connection, repo_sha):
        url = f"/{REPO}/resolve/main/model.safetensors"
        response, body = self.fetch(connection, "HEAD", url)
        assert response.status == 200 and body == b""
        assert response.getheader("X-Repo-Commit") == repo_sha
        assert response.getheader("ETag") == f'"{sha256(WEIGHTS)}"'
        assert response.getheader("X-Linked-Etag") == f'"{sha256(WEIGHTS)}"'
        assert response.getheader("X-Linked-Size") == str(len(WEIGHTS))
        assert response.getheader("Content-Length") == str(len(WEIGHTS))
        assert response.getheader("Accept-Ranges") == "bytes"

        response, _ = self.fetch(connection, "HEAD", f"/{REPO}/resolve/main/config.json")
        assert response.getheader("ETag") == f'"{git_blob_sha1(CONFIG)}"'
        assert response.getheader("X-Linked-Etag") is None

        total = len(WEIGHTS)
        for header, (start, stop) in {
            "bytes=10-19": (10, 20),
            "bytes=16000-": (16000, total),
            "bytes=-100": (total - 100, total),
            "bytes=16000-99999": (16000, total),
        }.items():
            response, body = self.fetch(connection, "GET", url, {"Range": header})
            assert response.status == 206, header
            assert body == WEIGHTS[start:stop], header
            assert response.getheader("Content-Range") == f"bytes {start}-{stop - 1}/{total}"

        response, body = self.fetch(connection, "GET", url, {"Range": f"bytes={total}-"})
        assert response.status == 416 and body == b""
        assert response.getheader("Content-Range") == f"bytes */{total}"

    def test_errors_carry_hub_error_headers(self, hub, connection, repo_sha):
        response, body = self.fetch(connection, "GET", f"/{REPO}/resolve/main/missing.json")
        assert response.status == 404
        assert response.getheader("X-Error-Code") == "EntryNotFound"
        assert response.getheader("X-Repo-Commit") == repo_sha
        assert "missing.json" in json.loads(body)["error"]

        response, _ = self.fetch(connection, "GET", "/api/models/org/missing/revision/main")
        assert (response.status, response.getheader("X-Error-Code")) == (404, "RepoNotFound")
        response, _ = self.fetch(connection, "GET", f"/{REPO}/resolve/nope/config.json")
        assert (response.status, response.getheader("X-Error-Code")) == (404, "RevisionNotFound")
        response, _ = self.fetch(connection, "GET", "/api/agent-harnesses")
        assert response.status == 404

        hub.fail_all(503)
        response, _ = self.fetch(connection, "GET", f"/api/models/{REPO}")
        assert response.status == 503
        hub.fail_all(None)
        response, _ = self.fetch(connection, "GET", f"/api/models/{REPO}")
        assert response.status == 200

    def test_paths_info_and_folder_listing(self, hub, connection, repo_sha):
        response, body = self.fetch(
            connection,
            "POST",
            f"/api/models/{REPO}/paths-info/{repo_sha}",
            {"Content-Type": "application/x-www-form-urlencoded"},
            "paths=config.json&paths=sub&paths=absent&expand=false",
        )
        assert response.status == 200
        assert [(e["type"], e["path"]) for e in json.loads(body)] == [("file", "config.json"), ("directory", "sub")]

        response, body = self.fetch(connection, "GET", f"/api/models/{REPO}/tree/main/sub")
        assert [e["path"] for e in json.loads(body)] == ["sub/dir"]
        response, _ = self.fetch(connection, "GET", f"/api/models/{REPO}/tree/main/absent")
        assert response.getheader("X-Error-Code") == "EntryNotFound"

    def test_stop_closes_kept_alive_connections(self, hub, connection, repo_sha):
        response, _ = self.fetch(connection, "GET", f"/api/models/{REPO}")
        assert response.status == 200
        hub.stop()
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            self.fetch(connection, "GET", f"/api/models/{REPO}")


def test_a_throttled_file_arrives_whole_at_about_the_rate_asked(hub, tmp_path):
    weights = os.urandom(512 * 1024)
    hub.commit(REPO, {"model.safetensors": weights})
    hub.throttle(REPO, "model.safetensors", 1024 * 1024)  # half a second for the file

    result = run_client(
        hub,
        tmp_path,
        """
        started = time.monotonic()
        path = hf_hub_download("org/model", "model.safetensors", cache_dir=sys.argv[1])
        result = [hashlib.sha256(Path(path).read_bytes()).hexdigest(), time.monotonic() - started]
        """,
    )

    digest, seconds = result
    assert digest == sha256(weights)
    assert 0.45 < seconds < 5
    hub.reset_faults()
    started = time.monotonic()
    with urllib.request.urlopen(f"{hub.url}/{REPO}/resolve/main/model.safetensors") as answer:
        assert answer.read() == weights
    assert time.monotonic() - started < 0.25  # full speed again
