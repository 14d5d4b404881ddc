"""`vdeploy lock` through the real CLI and the real huggingface_hub client, against the fake Hub."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from manifests import pin_engine

from vdeploy.errors import LockError
from vdeploy.lockfile import Lock, dumps_lock, loads_lock

CONFIG = b'{"architectures": ["TinyModel"]}\n'
WEIGHTS = bytes(range(256)) * 80  # LFS by its suffix
README = b"# a model\n"
NESTED = b'{"nested": true}\n'


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hub_manifest(repo: str, revision: str = "main", extra: str = "") -> str:
    return f'[model]\nrepo = "{repo}"\nrevision = "{revision}"\n{extra}'


def read_lock(path: Path) -> Lock:
    return loads_lock(path.read_text(encoding="utf-8"))


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    return lines[0]


def store_repos(store: Path) -> list[str]:
    """The repos with a snapshot in the store (`lock` may keep small blobs it read, never snapshots)."""
    return sorted({p.parent.parent.name for p in store.glob("models--*/snapshots/*")}) if store.exists() else []


@pytest.fixture
def model_repo(fake_hub, repo_id) -> tuple[str, str]:
    sha = fake_hub.commit(
        repo_id,
        {"config.json": CONFIG, "model.safetensors": WEIGHTS, "README.md": README, "sub/dir/extra.json": NESTED},
    )
    return repo_id, sha


# ---- resolution ------------------------------------------------------------------------------


def test_branch_tag_and_commit_resolve_to_their_commits(project, fake_hub, repo_id):
    first = fake_hub.commit(repo_id, {"config.json": CONFIG})
    fake_hub.tag(repo_id, "v1.0", first)
    fake_hub.branch(repo_id, "stable", first)
    head = fake_hub.commit(repo_id, {"config.json": b'{"second": true}\n'})
    for revision, expected in [("main", head), ("v1.0", first), ("stable", first), (first, first)]:
        folder = project.folder / revision[:12].replace(".", "_")
        folder.mkdir()
        (folder / "vdeploy.toml").write_text(pin_engine(hub_manifest(repo_id, revision)))
        project.run_vdeploy("lock", folder)
        lock = read_lock(folder / "vdeploy.lock")
        assert (lock.model.revision, lock.model.commit) == (revision, expected)
        wanted = CONFIG if expected == first else b'{"second": true}\n'
        assert [(f.path, f.size, f.sha256) for f in lock.model.files] == [("config.json", len(wanted), sha256(wanted))]


def test_lock_records_every_file_with_size_and_sha256(project, model_repo):
    repo, sha = model_repo
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    lock = read_lock(project.lock)
    assert lock.model.repo == repo and lock.model.commit == sha
    assert lock.model.name == "models--" + repo.replace("/", "--")
    assert {f.path: (f.size, f.sha256) for f in lock.model.files} == {
        "README.md": (len(README), sha256(README)),
        "config.json": (len(CONFIG), sha256(CONFIG)),
        "model.safetensors": (len(WEIGHTS), sha256(WEIGHTS)),
        "sub/dir/extra.json": (len(NESTED), sha256(NESTED)),
    }
    # LFS files are named by sha256 in the store, small git files by their git blob id, as the Hub does.
    blobs = {f.path: f.blob for f in lock.model.files}
    assert blobs["model.safetensors"] == sha256(WEIGHTS)
    assert blobs["config.json"] == hashlib.sha1(b"blob %d\0" % len(CONFIG) + CONFIG).hexdigest()
    assert len(lock.deployment) == 64 and len(lock.manifest_hash) == 64


def test_lock_reads_lfs_hashes_from_the_tree_and_downloads_only_small_files(project, fake_hub, model_repo):
    repo, sha = model_repo
    project.write_manifest(hub_manifest(repo))
    fake_hub.clear_requests()
    project.run_vdeploy("lock")
    mine = [(method, path) for method, path in fake_hub.requests if repo in path]
    downloads = sorted(path.rsplit("/", 1)[-1] for method, path in mine if "/resolve/" in path)
    assert downloads == ["README.md", "config.json", "extra.json"]  # never the LFS weights
    assert sum("/tree/" in path for _, path in mine) == 1


# ---- re-locking: pins are kept unless the manifest changed or --update --------------------------


def test_new_upstream_commit_does_not_move_the_lock_without_update(project, fake_hub, model_repo):
    repo, first = model_repo
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    before = project.lock.read_bytes()

    second = fake_hub.commit(repo, {"config.json": b'{"changed": 1}\n'})
    fake_hub.clear_requests()
    code, out, err = project.run_vdeploy("lock")
    assert "up to date" in err
    assert project.lock.read_bytes() == before
    assert read_lock(project.lock).model.commit == first
    assert not [r for r in fake_hub.requests if repo in r[1]], "re-locking an unchanged source asked the Hub"

    code, out, err = project.run_vdeploy("lock", "--update")
    assert "lock --update changes:" in err, err
    assert f"{first[:12]} → {second[:12]}" in err, err
    lock = read_lock(project.lock)
    assert lock.model.commit == second
    assert lock.model.file("config.json").sha256 == sha256(b'{"changed": 1}\n')

    code, out, err = project.run_vdeploy("lock", "--update")
    assert "no source moved" in err and "moved model" not in err


def test_changing_a_source_in_the_manifest_re_resolves_it(project, fake_hub, model_repo):
    repo, first = model_repo
    fake_hub.tag(repo, "v1", first)
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    second = fake_hub.commit(repo, {"config.json": b"{}\n"})
    assert read_lock(project.lock).model.commit == first
    project.write_manifest(hub_manifest(repo, "v1"))
    project.run_vdeploy("lock")
    assert read_lock(project.lock).model.commit == first
    project.write_manifest(hub_manifest(repo, second))
    project.run_vdeploy("lock")
    assert read_lock(project.lock).model.commit == second


# ---- the lock file itself ------------------------------------------------------------------------


RICH_EXTRA = """
[tokenizer]
repo = "{tokenizer}"

[chat-template]
file = "templates/chat.jinja"

[serve]
served-model-name = "tiny"
max-model-len = 2048
gpu-memory-utilization = 0.5
api-key = {{ env = "VLLM_API_KEY" }}
port = 8000

[runtime]
seed = 3
env = {{ OMP_NUM_THREADS = "2", VLLM_LOGGING_LEVEL = "INFO" }}
"""


def _rich_project(folder: Path, repo: str, tokenizer: str) -> None:
    (folder / "templates").mkdir(parents=True)
    (folder / "templates" / "chat.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (folder / "vdeploy.toml").write_text(pin_engine(
        hub_manifest(repo, extra='include = ["*.json", "*.safetensors"]\n')
        + RICH_EXTRA.format(tokenizer=tokenizer)
        + '\n[store]\ndownload-dir = "models"\n'
    ))


def test_lock_bytes_are_deterministic(project, fake_hub, model_repo, tmp_path):
    repo, _ = model_repo
    tokenizer = repo + "-tok"
    fake_hub.commit(tokenizer, {"tokenizer.json": b'{"vocab": {}}\n', "tokenizer_config.json": b"{}\n"})
    first, second = tmp_path / "one", tmp_path / "two" / "deeper"
    _rich_project(first, repo, tokenizer)
    _rich_project(second, repo, tokenizer)
    project.run_vdeploy("lock", first)
    text = (first / "vdeploy.lock").read_text()

    (first / "vdeploy.lock").unlink()
    project.run_vdeploy("lock", first)
    assert (first / "vdeploy.lock").read_text() == text  # lock twice, same bytes

    project.run_vdeploy("lock", second)
    assert (second / "vdeploy.lock").read_text() == text  # two folders, same bytes
    assert str(tmp_path) not in text  # no machine paths

    lock = loads_lock(text)
    assert dumps_lock(lock) == text
    assert lock.tokenizer is not None and lock.tokenizer.repo == tokenizer
    assert [f.path for f in lock.model.files] == ["config.json", "model.safetensors", "sub/dir/extra.json"]
    assert lock.chat_template.origin == "file" and lock.chat_template.file == "templates/chat.jinja"
    assert lock.serve["api-key"] == {"env": "VLLM_API_KEY"}
    assert text.startswith("# vdeploy.lock") and "\nversion = 2\n" in text
    assert "\r" not in text and text.endswith("\n")


def test_operational_flags_stay_out_of_the_deployment_id(project, model_repo):
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo, extra="[serve]\nport = 8000\nmax-model-len = 2048\n"))
    project.run_vdeploy("lock")
    base = read_lock(project.lock).deployment
    project.write_manifest(hub_manifest(repo, extra="[serve]\nport = 9000\nmax-model-len = 2048\n"))
    project.run_vdeploy("lock")
    assert read_lock(project.lock).deployment == base
    project.write_manifest(hub_manifest(repo, extra="[serve]\nport = 9000\nmax-model-len = 4096\n"))
    project.run_vdeploy("lock")
    assert read_lock(project.lock).deployment != base


def test_an_up_to_date_lock_is_not_rewritten(project, model_repo):
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    old = 1_000_000_000_000_000_000
    os.utime(project.lock, ns=(old, old))
    inode = project.lock.stat().st_ino
    code, out, err = project.run_vdeploy("lock")
    assert "up to date" in err
    assert project.lock.stat().st_mtime_ns == old and project.lock.stat().st_ino == inode
    assert sorted(p.name for p in project.folder.iterdir()) == ["vdeploy.lock", "vdeploy.toml"]  # no temp files


def test_a_changed_manifest_makes_fetch_refuse_with_the_reason(project, fake_hub, model_repo):
    repo, sha = model_repo
    fake_hub.tag(repo, "v2", sha)
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    project.write_manifest(hub_manifest(repo, "v2", extra="[serve]\nmax-model-len = 1024\n"))
    code, out, err = project.run_vdeploy("fetch", expect=1)
    message = one_line(err)
    assert "stale" in message and "vdeploy lock" in message
    assert "model.revision changed: main → v2" in message
    assert "serve.max-model-len added" in message
    assert store_repos(project.store) == []


def test_an_unreadable_lock_is_rewritten_by_lock_and_refused_by_fetch(project, model_repo):
    repo, sha = model_repo
    project.write_manifest(hub_manifest(repo))
    project.lock.write_text("version = 1\n[model\n")
    code, out, err = project.run_vdeploy("fetch", expect=1)
    assert "not a readable lock" in one_line(err)
    project.run_vdeploy("lock")
    assert read_lock(project.lock).model.commit == sha


def test_a_lock_from_a_newer_vdeploy_is_left_alone(project, model_repo):
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo))
    project.lock.write_text("version = 99\n")
    code, out, err = project.run_vdeploy("lock", expect=1)
    assert "upgrade vdeploy" in one_line(err)
    assert project.lock.read_text() == "version = 99\n"


HOSTILE_LOCK_NAMES = [
    ("path", "../../etc/passwd"), ("blob", "../../../evil"), ("commit", "../x"), ("store-name", "../models--x"),
    ("revision", "../../../../evil"), ("revision", "/abs/evil"), ("revision", "main/../../../../evil"),
]


def test_a_lock_with_hostile_names_is_refused(project, model_repo):
    """A lock can come from someone else's commit: its names must not steer writes out of the store."""
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock")
    text = project.lock.read_text()
    for field, value in HOSTILE_LOCK_NAMES:
        lines = text.splitlines(keepends=True)
        index = next(i for i, line in enumerate(lines) if line.startswith(f"{field} = "))
        lines[index] = f'{field} = "{value}"\n'
        project.lock.write_text("".join(lines))
        code, out, err = project.run_vdeploy("fetch", expect=1)
        assert value in one_line(err), field
        assert store_repos(project.store) == []
        assert not (project.home / "etc").exists() and not (project.folder.parent / "evil").exists()


# ---- include filters and nested folders ----------------------------------------------------------


def test_include_filters_select_files_and_a_filter_matching_nothing_fails(project, model_repo):
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo, extra='include = ["*.safetensors", "sub/*"]\n'))
    project.run_vdeploy("lock")
    assert [f.path for f in read_lock(project.lock).model.files] == ["model.safetensors", "sub/dir/extra.json"]

    project.write_manifest(hub_manifest(repo, extra='include = ["*.gguf"]\n'))
    code, out, err = project.run_vdeploy("lock", expect=1)
    assert "no files match include" in one_line(err)


def test_nested_folders_are_listed_with_their_full_paths(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"a/b/c/deep.json": b"{}\n", "a/top.safetensors": WEIGHTS, "root.txt": b"r\n"})
    project.write_manifest(hub_manifest(repo_id))
    project.run_vdeploy("lock")
    assert [f.path for f in read_lock(project.lock).model.files] == ["a/b/c/deep.json", "a/top.safetensors", "root.txt"]


def test_a_paginated_tree_is_listed_in_full(project, fake_hub, repo_id):
    files = {f"shard-{i:03d}.json": f"{i}\n".encode() for i in range(25)}
    fake_hub.commit(repo_id, files)
    project.write_manifest(hub_manifest(repo_id))
    old_size = fake_hub.page_size
    fake_hub.page_size = 10
    try:
        project.run_vdeploy("lock")
    finally:
        fake_hub.page_size = old_size
    assert len(read_lock(project.lock).model.files) == 25


# ---- a Hub that cannot give what the manifest asks -----------------------------------------------


@pytest.mark.parametrize("what", ["repo", "revision"])
def test_missing_repo_or_revision_is_one_line_and_leaves_nothing(project, fake_hub, model_repo, what):
    repo, _ = model_repo
    if what == "repo":
        project.write_manifest(hub_manifest(repo + "-nope"))
        expected = "no such repo"
    else:
        project.write_manifest(hub_manifest(repo, "no-such-branch"))
        expected = "revision not found"
    code, out, err = project.run_vdeploy("lock", expect=1)
    message = one_line(err)
    assert expected in message and repo in message
    assert not project.lock.exists()
    assert store_repos(project.store) == []


def test_an_unreachable_hub_is_one_line(project, model_repo):
    repo, _ = model_repo
    project.write_manifest(hub_manifest(repo))
    code, out, err = project.run_vdeploy("lock", env={"HF_ENDPOINT": "http://127.0.0.1:9"}, expect=1)
    assert repo in one_line(err)
    assert not project.lock.exists()


@pytest.mark.parametrize("hostile", ["../evil", "sub/../../evil", "..\\evil"])
def test_a_hostile_file_name_in_the_repo_is_refused(project, fake_hub, repo_id, hostile):
    fake_hub.commit(repo_id, {"config.json": CONFIG, hostile: b"pwned\n"})
    project.write_manifest(hub_manifest(repo_id))
    code, out, err = project.run_vdeploy("lock", expect=1)
    message = one_line(err)
    assert repr(hostile) in message and "refusing" in message
    assert not project.lock.exists()
    assert store_repos(project.store) == []
    assert not (project.home / "evil").exists() and not (project.folder / "evil").exists()


def test_a_small_file_served_with_wrong_bytes_is_refused_at_lock(project, fake_hub, model_repo):
    repo, _ = model_repo
    fake_hub.serve_wrong_bytes(repo, "config.json")
    project.write_manifest(hub_manifest(repo))
    code, out, err = project.run_vdeploy("lock", expect=1)
    assert "config.json" in one_line(err) and "git id" in err
    assert not project.lock.exists()


# ---- local folders -------------------------------------------------------------------------------


def _checkpoint(folder: Path) -> dict[str, bytes]:
    files = {"config.json": CONFIG, "model.safetensors": WEIGHTS, "nested/tokenizer.json": b'{"v": 1}\n'}
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return files


LOCAL_MANIFEST = '[model]\npath = "ckpt"\n\n[store]\ndownload-dir = "models"\n'


def test_a_local_folder_is_hashed_and_imported_into_the_store(project):
    files = _checkpoint(project.folder / "ckpt")
    project.write_manifest(LOCAL_MANIFEST)
    project.run_vdeploy("lock")
    lock = read_lock(project.lock)
    assert lock.model.is_local and lock.model.path == "ckpt"
    assert {f.path: f.sha256 for f in lock.model.files} == {p: sha256(d) for p, d in files.items()}
    store = project.folder / "models"
    snapshot = store / lock.model.name / "snapshots" / lock.model.commit
    for path, data in files.items():
        entry = snapshot / path
        assert entry.is_symlink() and not os.path.isabs(os.readlink(entry))
        assert entry.read_bytes() == data
    project.run_vdeploy("verify", "--full")


def test_a_later_edit_of_the_folder_does_not_change_the_store(project):
    _checkpoint(project.folder / "ckpt")
    project.write_manifest(LOCAL_MANIFEST)
    project.run_vdeploy("lock")
    lock = read_lock(project.lock)
    entry = project.folder / "models" / lock.model.name / "snapshots" / lock.model.commit / "model.safetensors"

    (project.folder / "ckpt" / "model.safetensors").write_bytes(b"retrained" * 100)
    assert entry.read_bytes() == WEIGHTS  # the store holds its own copy, not a link to the folder
    project.run_vdeploy("verify", "--full")
    project.run_vdeploy("fetch")  # the locked bytes are in the store: nothing to do

    # Without the store copy, the locked bytes exist nowhere: fetch says so and stores nothing bad.
    shutil.rmtree(project.folder / "models")
    code, out, err = project.run_vdeploy("fetch", expect=1)
    message = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "model.safetensors changed" in message[0] and "nothing was stored" in message[0]
    assert "vdeploy lock" in message[0] and "Traceback" not in err
    assert not entry.exists() and not entry.is_symlink()
    blobs = project.folder / "models" / lock.model.name / "blobs"
    assert not any(p.name.startswith(lock.model.file("model.safetensors").sha256) for p in blobs.iterdir())

    # Re-locking pins the new contents.
    project.run_vdeploy("lock")
    relocked = read_lock(project.lock)
    assert relocked.model.commit != lock.model.commit
    assert relocked.model.file("model.safetensors").sha256 == sha256(b"retrained" * 100)
    project.run_vdeploy("verify", "--full")


def test_a_local_symlink_leaving_the_folder_is_refused(project, tmp_path):
    _checkpoint(project.folder / "ckpt")
    (tmp_path / "secret").write_text("outside")
    (project.folder / "ckpt" / "leak.json").symlink_to(tmp_path / "secret")
    project.write_manifest(LOCAL_MANIFEST)
    code, out, err = project.run_vdeploy("lock", expect=1)
    assert "leak.json" in one_line(err) and "outside" in err
    assert not project.lock.exists()


def test_a_missing_local_folder_is_one_line(project):
    project.write_manifest(LOCAL_MANIFEST)
    code, out, err = project.run_vdeploy("lock", expect=1)
    assert "ckpt" in one_line(err) and "not a folder" in err


def test_lock_caches_its_parse_reading_writes_nothing_and_never_serves_a_stale_one(
    project, model_repo, monkeypatch, tmp_path,
):
    from vdeploy.lockfile import read_lock as read_lock_file

    cache = tmp_path / "cache"
    if (project.cache / "flags").is_dir():  # the engine's catalogue, probed once by the session
        shutil.copytree(project.cache / "flags", cache / "flags")
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(cache))
    repo, sha = model_repo
    project.write_manifest(hub_manifest(repo))
    project.run_vdeploy("lock", env={"VDEPLOY_CACHE_DIR": str(cache)})
    text = project.lock.read_text()
    (cached,) = (cache / "parsed-locks").glob("*.json")  # written by `lock`
    assert read_lock_file(project.lock) == loads_lock(text)  # from the cache

    edited = text.replace(f'commit = "{sha}"', f'commit = "{"0" * 40}"')
    project.lock.write_text(edited)
    with pytest.raises(LockError, match="edited by hand"):  # the new bytes are read, and refused
        read_lock_file(project.lock)
    assert list((cache / "parsed-locks").glob("*.json")) == [cached]  # reading wrote nothing
    cached.write_text("{not json")
    project.lock.write_text(text)
    assert read_lock_file(project.lock) == loads_lock(text)  # a broken cache entry is only skipped
