"""`vdeploy fetch` and `vdeploy verify`: the store in the Hugging Face cache layout, through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdeploy.lockfile import Lock, loads_lock

MIB = 1024 * 1024
CHUNK = 10 * MIB  # whole download chunks (vdeploy.hub.DOWNLOAD_CHUNK_SIZE): a cut 1 MiB past it resumes from it
CONFIG = b'{"architectures": ["TinyModel"]}\n'
WEIGHTS = hashlib.sha256(b"weights").digest() * 2048  # 64 KiB, LFS
TOKENIZER = b'{"vocab": {"a": 0}}\n'
NESTED = b"deep\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def big(size: int, seed: bytes) -> bytes:
    """Incompressible-looking bytes, quickly."""
    block = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(256))  # 8 KiB
    return (block * (size // len(block) + 1))[:size]


def read_lock(project) -> Lock:
    return loads_lock(project.lock.read_text(encoding="utf-8"))


def gets(hub, repo: str) -> list[str]:
    """The files of `repo` the hub was asked to send, by name."""
    return sorted(path.split("/resolve/", 1)[1].split("/", 1)[1] for method, path in hub.requests
                  if method == "GET" and path.startswith(f"/{repo}/resolve/"))


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def lock_and_fetch(project, repo: str, revision: str = "main") -> Lock:
    project.write_manifest(f'[model]\nrepo = "{repo}"\nrevision = "{revision}"\n')
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    return read_lock(project)


@pytest.fixture
def model_repo(fake_hub, repo_id) -> str:
    fake_hub.commit(
        repo_id,
        {"config.json": CONFIG, "model.safetensors": WEIGHTS, "tokenizer.json": TOKENIZER, "sub/dir/nested.txt": NESTED},
    )
    return repo_id


# ---- layout ------------------------------------------------------------------------------------


def test_fetch_builds_the_hugging_face_cache_layout(project, model_repo):
    lock = lock_and_fetch(project, model_repo)
    repo_dir = project.store / ("models--" + model_repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / lock.model.commit
    expected = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "tokenizer.json": TOKENIZER,
                "sub/dir/nested.txt": NESTED}
    for path, data in expected.items():
        entry = snapshot / path
        target = os.readlink(entry)
        assert not os.path.isabs(target)
        blob = (entry.parent / target).resolve()
        assert blob.parent == (repo_dir / "blobs").resolve()
        assert blob.name == lock.model.file(path).blob
        assert blob.read_bytes() == data and entry.read_bytes() == data
    assert not list((repo_dir / "blobs").glob("*.incomplete"))

    # huggingface_hub itself finds the files in this store, as vLLM and `hf` would.
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(model_repo, "sub/dir/nested.txt", cache_dir=project.store, revision=lock.model.commit)
    assert found is not None and Path(found).read_bytes() == NESTED

    code, out, err = project.run_vdeploy("verify")
    assert "4 files: ok" in err

    # A second fetch finds everything in place and asks the Hub for nothing.
    project.hub.clear_requests()
    code, out, err = project.run_vdeploy("fetch")
    assert [r for r in project.hub.requests if model_repo in r[1]] == []
    assert "0 downloaded" in err and "4 already present" in err


# ---- blobs are shared --------------------------------------------------------------------------


def test_a_new_revision_downloads_only_the_changed_file(project, fake_hub, model_repo):
    first = lock_and_fetch(project, model_repo)
    fake_hub.commit(model_repo, {"config.json": b'{"architectures": ["Changed"]}\n'})
    project.run_vdeploy("lock", "--update")
    fake_hub.clear_requests()
    code, out, err = project.run_vdeploy("fetch")
    assert gets(fake_hub, model_repo) == []  # `lock --update` read the new config.json to hash it, and kept it
    second = read_lock(project)
    assert second.model.commit != first.model.commit
    repo_dir = project.store / second.model.name
    assert sorted(p.name for p in (repo_dir / "snapshots").iterdir()) == sorted([first.model.commit, second.model.commit])
    old_weights = repo_dir / "snapshots" / first.model.commit / "model.safetensors"
    new_weights = repo_dir / "snapshots" / second.model.commit / "model.safetensors"
    assert old_weights.resolve() == new_weights.resolve()  # one blob, two snapshots
    assert len(list((repo_dir / "blobs").iterdir())) == 5
    project.run_vdeploy("verify", "--full")


def test_the_same_bytes_in_another_repo_are_not_downloaded_again(project, fake_hub, model_repo):
    lock_and_fetch(project, model_repo)
    other = model_repo + "-copy"
    fake_hub.commit(other, {"model.safetensors": WEIGHTS, "config.json": b"{}\n"})
    project.write_manifest(f'[model]\nrepo = "{other}"\n')
    project.run_vdeploy("lock")
    fake_hub.clear_requests()
    code, out, err = project.run_vdeploy("fetch")
    assert gets(fake_hub, other) == []  # config.json was kept by `lock`, the weights are another repo's blob
    assert "1 reused" in err
    blob = project.store / ("models--" + other.replace("/", "--")) / "blobs" / sha256(WEIGHTS)
    assert blob.read_bytes() == WEIGHTS
    project.run_vdeploy("verify", "--full")


def test_files_downloaded_by_huggingface_hub_are_reused(project, fake_hub, model_repo):
    """The default store is the HF cache: what `hf download` or vLLM already fetched is not fetched again."""
    script = "from huggingface_hub import snapshot_download; snapshot_download(%r)" % model_repo
    subprocess.run([sys.executable, "-c", script], env=project.env(), check=True, capture_output=True, timeout=60)
    project.write_manifest(f'[model]\nrepo = "{model_repo}"\n')
    project.run_vdeploy("lock")
    fake_hub.clear_requests()
    code, out, err = project.run_vdeploy("fetch")
    assert gets(fake_hub, model_repo) == []
    assert "0 downloaded" in err
    project.run_vdeploy("verify", "--full")


# ---- a Hub that misbehaves ---------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["model.safetensors", "config.json"])
def test_same_size_wrong_bytes_are_refused_and_leave_nothing(project, fake_hub, model_repo, bad, tmp_path):
    project.write_manifest(f'[model]\nrepo = "{model_repo}"\n')
    # Locked on another machine (another store), so this store must download even the small files.
    project.run_vdeploy("lock", env={"HF_HOME": str(tmp_path / "elsewhere")})
    lock = read_lock(project)
    fake_hub.serve_wrong_bytes(model_repo, bad)
    code, out, err = project.run_vdeploy("fetch", expect=1)
    (message,) = error_lines(err)
    assert bad in message and "sha256" in message and "nothing was stored" in message
    repo_dir = project.store / lock.model.name
    entry = repo_dir / "snapshots" / lock.model.commit / bad
    assert not entry.exists() and not entry.is_symlink()
    blob = lock.model.file(bad).blob
    assert [p.name for p in (repo_dir / "blobs").iterdir() if p.name.startswith(blob)] == []
    code, out, err = project.run_vdeploy("verify", expect=1)
    assert f"missing: model: {bad}" in err


def test_a_connection_cut_mid_file_is_resumed_with_a_range_request(project, fake_hub, repo_id):
    weights = big(CHUNK + 2 * MIB, b"cut")
    fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": weights})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    fake_hub.cut_connection(repo_id, "model.safetensors", after_bytes=CHUNK + MIB)
    fake_hub.clear_requests()
    project.run_vdeploy("fetch")
    ranges = fake_hub.ranges_asked(repo_id, "model.safetensors")
    assert ranges == [None, f"bytes={CHUNK}-"]
    lock = read_lock(project)
    assert (project.store / lock.model.name / "snapshots" / lock.model.commit / "model.safetensors").read_bytes() == weights
    project.run_vdeploy("verify", "--full")


def test_a_connection_that_keeps_failing_is_a_clear_error_and_the_next_fetch_completes(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    # huggingface_hub retries 5 times, pausing a second each time: the 6th cut is final.
    fake_hub.cut_connection(repo_id, "model.safetensors", after_bytes=1000, times=6)
    code, out, err = project.run_vdeploy("fetch", expect=1)
    (message,) = error_lines(err)
    assert "model.safetensors" in message
    lock = read_lock(project)
    entry = project.store / lock.model.name / "snapshots" / lock.model.commit / "model.safetensors"
    assert not entry.exists()
    project.run_vdeploy("fetch")
    assert entry.read_bytes() == WEIGHTS
    project.run_vdeploy("verify", "--full")


def test_a_fetch_killed_mid_download_resumes_and_never_shows_a_partial_file(project, fake_hub, repo_id):
    weights = big(CHUNK + 3 * MIB, b"kill")
    fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": weights})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    lock = read_lock(project)
    blob = project.store / lock.model.name / "blobs" / sha256(weights)
    partial = blob.with_name(blob.name + ".incomplete")
    entry = project.store / lock.model.name / "snapshots" / lock.model.commit / "model.safetensors"

    # The cut makes the client write its first 10 MiB chunk, then pause a second before retrying:
    # the fetch is killed in that pause, with a partial file on disk.
    fake_hub.cut_connection(repo_id, "model.safetensors", after_bytes=CHUNK + MIB)
    fetching = subprocess.Popen(
        [sys.executable, "-m", "vdeploy", "fetch"], cwd=project.folder, env=project.env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (partial.exists() and partial.stat().st_size >= CHUNK):
            assert fetching.poll() is None, "fetch ended before it could be killed"
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.01)
        fetching.send_signal(signal.SIGKILL)
    finally:
        fetching.wait(timeout=30)
    assert fetching.returncode == -signal.SIGKILL
    assert not entry.exists() and not blob.exists()
    code, out, err = project.run_vdeploy("verify", expect=1)
    assert "missing: model: model.safetensors" in err

    fake_hub.clear_requests()
    project.run_vdeploy("fetch")
    ranges = fake_hub.ranges_asked(repo_id, "model.safetensors")
    assert ranges == [f"bytes={CHUNK}-"]  # resumed, not restarted
    assert entry.read_bytes() == weights and not partial.exists()
    project.run_vdeploy("verify", "--full")


def test_a_partial_file_with_wrong_bytes_is_discarded_and_the_next_fetch_completes(project, fake_hub, repo_id):
    weights = big(CHUNK + MIB, b"partial")
    fake_hub.commit(repo_id, {"model.safetensors": weights})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    lock = read_lock(project)
    blob = project.store / lock.model.name / "blobs" / sha256(weights)
    blob.parent.mkdir(parents=True)
    blob.with_name(blob.name + ".incomplete").write_bytes(b"\0" * CHUNK)  # left by some crashed tool
    code, out, err = project.run_vdeploy("fetch", expect=1)
    assert "nothing was stored" in error_lines(err)[0]
    assert not blob.exists() and not blob.with_name(blob.name + ".incomplete").exists()
    project.run_vdeploy("fetch")
    project.run_vdeploy("verify", "--full")


def test_two_fetches_of_one_store_at_once_both_succeed(project, fake_hub, repo_id):
    files = {f"shard-{i}.safetensors": big(MIB, bytes([i])) for i in range(6)}
    files["config.json"] = CONFIG
    files["model.safetensors"] = big(CHUNK + MIB, b"both")
    fake_hub.commit(repo_id, files)
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    # One download is cut, so the other fetch finds that blob being written and must wait for it.
    fake_hub.cut_connection(repo_id, "model.safetensors", after_bytes=CHUNK + 1000)
    fake_hub.clear_requests()
    command = [sys.executable, "-m", "vdeploy", "fetch"]
    fetches = [
        subprocess.Popen(command, cwd=project.folder, env=project.env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [(f.wait(timeout=60), f.stderr.read()) for f in fetches]
    for fetch in fetches:
        fetch.stdout.close()
        fetch.stderr.close()
    assert [code for code, _ in results] == [0, 0], results
    # Each file was downloaded once in all (the cut one twice: the cut, then its resumption);
    # config.json was read by `lock` and kept.
    downloaded = sorted(set(files) - {"config.json"})
    assert sorted(set(gets(fake_hub, repo_id))) == downloaded
    assert len(gets(fake_hub, repo_id)) == len(downloaded) + 1
    project.run_vdeploy("verify", "--full")
    lock = read_lock(project)
    blobs = project.store / lock.model.name / "blobs"
    assert sorted(p.name for p in blobs.iterdir()) == sorted(f.blob for f in lock.model.files)


# ---- verify ------------------------------------------------------------------------------------


def test_verify_lists_missing_extra_and_mismatching_files(project, model_repo):
    lock = lock_and_fetch(project, model_repo)
    snapshot = project.store / lock.model.name / "snapshots" / lock.model.commit
    (snapshot / "config.json").unlink()
    (snapshot / "sub" / "dir" / "nested.txt").resolve().unlink()  # the blob: a dangling link
    (snapshot / "sub" / "stray.bin").write_bytes(b"not locked")
    tokenizer_blob = (snapshot / "tokenizer.json").resolve()
    tokenizer_blob.write_bytes(b"x" * (len(TOKENIZER) + 1))  # a different size
    # The right bytes, but outside the store: vLLM would read a file nothing keeps in place.
    (project.folder / "elsewhere.safetensors").write_bytes(WEIGHTS)
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(project.folder / "elsewhere.safetensors")

    for mode in ([], ["--full"]):
        code, out, err = project.run_vdeploy("verify", *mode, expect=1)
        assert "missing: model: config.json" in err
        assert "missing: model: sub/dir/nested.txt" in err
        assert "extra: model: sub/stray.bin" in err
        assert "mismatch: model: tokenizer.json" in err
        assert "mismatch: model: model.safetensors" in err
        assert "5 problem(s)" in err and "Traceback" not in err

    # fetch repairs all but the extra file, a plain file it did not put there: it may be another
    # tool's, so fetch names it and fails, and never deletes it (extra links it removes).
    code, out, err = project.run_vdeploy("fetch", expect=1)
    assert f"{snapshot / 'sub' / 'stray.bin'}: not in the lock" in err.splitlines()[-1]
    code, out, err = project.run_vdeploy("verify", "--full", expect=1)
    assert "extra: model: sub/stray.bin" in err and "1 problem(s)" in err
    assert os.readlink(snapshot / "model.safetensors") == f"../../blobs/{lock.model.file('model.safetensors').blob}"
    (snapshot / "sub" / "stray.bin").unlink()
    project.run_vdeploy("verify", "--full")


def _corrupt_keeping_size(path: Path, restore_mtime: bool) -> None:
    info = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as out:  # in place: same inode
        out.write(data)
    if restore_mtime:
        os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert path.stat().st_ino == info.st_ino


def test_fast_verify_trusts_only_unchanged_fingerprints_full_verify_trusts_nothing(project, fake_hub, model_repo):
    lock = lock_and_fetch(project, model_repo)
    blobs = project.store / lock.model.name / "blobs"
    weights = blobs / lock.model.file("model.safetensors").blob
    tokenizer = blobs / lock.model.file("tokenizer.json").blob
    _corrupt_keeping_size(weights, restore_mtime=True)
    _corrupt_keeping_size(tokenizer, restore_mtime=False)

    # The tokenizer's mtime moved; the weights kept size, mtime and inode, but a write moves the
    # ctime, which no one can set back: fast verify re-hashes both, as --full does.
    for mode in ([], ["--full"]):
        code, out, err = project.run_vdeploy("verify", *mode, "--json", expect=1)
        report = json.loads(out)
        assert report["mismatched"] == ["model: model.safetensors", "model: tokenizer.json"]
        assert report["ok"] is False and report["checked"] == 4 and report["missing"] == report["extra"] == []

    # What --full found is no longer trusted: fetch replaces both.
    fake_hub.clear_requests()
    project.run_vdeploy("fetch")
    assert gets(fake_hub, model_repo) == ["model.safetensors", "tokenizer.json"]
    project.run_vdeploy("verify", "--full")
    assert weights.read_bytes() == WEIGHTS and tokenizer.read_bytes() == TOKENIZER


def test_verify_without_a_fetch_lists_every_file_missing(project, model_repo):
    project.write_manifest(f'[model]\nrepo = "{model_repo}"\n')
    project.run_vdeploy("lock")
    code, out, err = project.run_vdeploy("verify", expect=1)
    assert err.count("missing: model: ") == 4
