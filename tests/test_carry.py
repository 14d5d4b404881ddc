"""`vdeploy push` and `vdeploy pull` through the real CLI and a real registry (Debian's docker-registry
on 127.0.0.1, started here): the bundle's digest, no blob sent twice, a pull into an empty store on
another path that `verify --full` accepts, and every refusal leaving the store as it was.

The registry client's own cases (auth flows, redirects, chunked uploads, skopeo agreeing) are in
test_registry.py; these are the command's: a project's lock and store on each side.
"""

from __future__ import annotations

import os

import pytest

from registry_server import htpasswd_auth
from store_tree import tree
from test_bundle import CONFIG, assert_nothing_restored, bundle, commit_repos, safetensors, error_line, locked_project, write_project
from test_registry import start as started

SECRET = "s3cret-pass-9c1f"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    server = started(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def repos(fake_hub) -> tuple[str, str]:
    return commit_repos(fake_hub, "test/carry-model")


@pytest.fixture(scope="module")
def source(make_project, repos):
    return locked_project(make_project("source"), repos)


@pytest.fixture
def target(make_project, repos):
    """The same manifest in another folder: its own empty store (another HF_HOME) and no lock."""
    other = make_project("target")
    write_project(other, repos)
    return other


def last_line(stderr: str) -> str:
    """The error that ended a command which said how far it got first: one line, the last."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and "Traceback" not in stderr, stderr
    assert not any(line.startswith("error: ") for line in lines[:-1]), stderr
    return lines[-1]


def push(project, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    _, out, err = project.run_vdeploy("push", *args, env=env)
    return out.strip(), err


def pull(project, *args: str, env: dict[str, str] | None = None) -> tuple[str, str]:
    _, out, err = project.run_vdeploy("pull", *args, env=env)
    return out.strip(), err


def test_push_prints_the_bundles_digest_and_a_second_push_sends_no_blob(source, registry, tmp_path):
    digest = bundle(source, "-o", tmp_path / "bundle")
    reference, err = push(source, f"{registry.host}/carry/first:v1")
    assert reference == f"{registry.host}/carry/first@{digest}"
    sent = registry.blob_uploads("carry/first")
    assert sent, "the first push sent nothing"
    # one upload per blob: each opened once (POST) and finished once (PUT)
    finished = [path for method, path, _ in sent if method == "PUT"]
    assert len(finished) == len([m for m, _, _ in sent if m == "POST"]) == len(list((tmp_path / "bundle/blobs/sha256").iterdir())) - 1
    assert "0 blob(s) sent" not in err

    before = len(registry.requests())
    again, err = push(source, f"{registry.host}/carry/first:v1")
    assert again == reference
    assert registry.blob_uploads("carry/first", since=before) == []
    assert "0 blob(s) sent (0 bytes)" in err
    # The temporary layout is gone: nothing but the store's own entries stay in its folder.
    assert [p.name for p in source.store.iterdir() if p.name.startswith(".vdeploy-carry")] == []


def test_pull_by_tag_into_an_empty_store_on_another_path_restores_what_verify_full_accepts(source, target, registry):
    reference, _ = push(source, f"{registry.host}/carry/round:v1")
    assert not target.store.exists()
    printed, err = pull(target, f"{registry.host}/carry/round:v1")
    assert printed == reference  # the tag resolved, and the digest printed
    assert f"carry/round:v1 is {reference.split('@')[1]}" in err
    assert target.lock.read_bytes() == source.lock.read_bytes()
    assert tree(target.store) == tree(source.store)
    _, _, err = target.run_vdeploy("verify", "--full")
    assert "problem" not in err and ": ok" in err
    assert [p.name for p in target.store.iterdir() if p.name.startswith(".vdeploy-carry")] == []
    # Pulling again finds everything present and changes nothing.
    again, err = pull(target, reference)
    assert again == reference and "0 restored" in err
    assert tree(target.store) == tree(source.store)


def test_a_different_lock_in_the_folder_is_refused_in_one_line_before_the_store_is_touched(source, target, registry):
    reference, _ = push(source, f"{registry.host}/carry/other-lock")
    target.lock.write_text(source.lock.read_text() + "\n# another lock\n")
    held = target.lock.read_bytes()
    _, _, err = target.run_vdeploy("pull", reference, expect=1)
    assert "differs from the lock in the bundle" in last_line(err)
    assert target.lock.read_bytes() == held
    assert tree(target.store) == {}
    assert not target.store.exists() or list(target.store.iterdir()) == []


def test_a_blob_corrupted_in_the_registry_is_refused_with_nothing_in_the_store(make_project, fake_hub, registry, tmp_path):
    # Its own model: the registry stores a blob once for every repository, and this test damages one.
    own = ("test/carry-corrupt", "test/carry-corrupt-tok")
    fake_hub.commit(own[0], {"config.json": CONFIG, "model.safetensors": safetensors("a", 256, os.urandom(16))})
    fake_hub.commit(own[1], {"tokenizer.json": b'{"vocab": {"c": 0}}\n'})
    origin = locked_project(make_project("corrupt-source"), own)
    reference, _ = push(origin, f"{registry.host}/carry/corrupt:v1")
    weights = next(origin.store.rglob("model.safetensors")).resolve()  # the blob, named by its sha256
    stored = registry.blob_file("sha256:" + weights.name)
    stored.write_bytes(b"X" + stored.read_bytes()[1:])

    other = make_project("corrupt-target")
    write_project(other, own)
    _, _, err = other.run_vdeploy("pull", reference, expect=1)
    assert "does not match its digest" in last_line(err)
    assert_nothing_restored(other)
    assert tree(other.store) == {}


def test_a_moved_tag_does_not_change_what_a_pull_by_digest_gets(source, make_project, fake_hub, registry, repos):
    first, _ = push(source, f"{registry.host}/carry/moved:v1")
    # Another artifact of the same model under the same tag: another seed, so another lock.
    moved = make_project("moved")
    write_project(moved, repos)
    moved.manifest.write_text(moved.manifest.read_text().replace("[runtime]", "[runtime]\nseed = 7", 1))
    moved.run_vdeploy("lock", timeout=300)
    moved.run_vdeploy("fetch")
    second, _ = push(moved, f"{registry.host}/carry/moved:v1")
    assert second != first

    fresh = make_project("by-digest")
    write_project(fresh, repos)
    printed, _ = pull(fresh, first)
    assert printed == first
    assert fresh.lock.read_bytes() == source.lock.read_bytes()


@pytest.fixture(scope="module")
def locked_registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("basic-registry")
    server = started(folder, auth=htpasswd_auth(folder, {"ci": SECRET}))
    yield server
    server.stop()


def test_credentials_from_the_environment_reach_the_registry_and_no_file(source, target, locked_registry):
    ref = f"{locked_registry.host}/carry/private:v1"
    _, _, err = source.run_vdeploy("push", ref, expect=1)
    line = error_line(err)
    assert "VDEPLOY_REGISTRY_AUTH" in line or "login" in line
    auth = {"VDEPLOY_REGISTRY_AUTH": f"ci:{SECRET}"}
    reference, push_err = push(source, ref, env=auth)
    printed, pull_err = pull(target, ref, env=auth)
    assert printed == reference
    assert SECRET not in push_err + pull_err + reference
    for folder in (source.folder, target.folder, target.store, source.store):
        for path in folder.rglob("*"):
            if path.is_file() and not path.is_symlink():
                assert SECRET.encode() not in path.read_bytes(), path


def test_push_refuses_a_store_that_lacks_a_locked_file_in_one_line(source, target, registry):
    target.lock.write_bytes(source.lock.read_bytes())  # locked, never fetched: its store is empty
    _, _, err = target.run_vdeploy("push", f"{registry.host}/carry/empty:v1", expect=1)
    assert "run `vdeploy fetch` first" in error_line(err)
    assert registry.blob_uploads("carry/empty") == []


def test_pull_into_a_folder_without_a_manifest_is_one_line_and_writes_nothing(target, registry, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _, _, err = target.run_vdeploy("pull", f"{registry.host}/carry/first:v1", empty, expect=1)
    assert "vdeploy.toml" in error_line(err)
    assert list(empty.iterdir()) == []
    code, _, err = target.run_vdeploy("push", "a", "b", "c", expect=2)
    assert "one manifest and one reference" in err
