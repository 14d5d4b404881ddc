"""`vdeploy gc`: roots recorded by lock/fetch/up/unbundle, removal of only what vdeploy placed and
no live lock pins, files of other tools kept, downloads under way respected; through the real CLI."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from needs import needs_engine

CONFIG = b'{"architectures": ["TinyModel"]}\n'
README = b"# a card hf downloads first\n"
WEIGHTS_1 = hashlib.sha256(b"one").digest() * 2048  # 64 KiB, LFS
WEIGHTS_2 = hashlib.sha256(b"two").digest() * 2048
OTHER = hashlib.sha256(b"other").digest() * 1024


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_name(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def hf_download(project, store: Path, repo: str, *args: str) -> None:
    """The Hugging Face CLI itself, into the same cache."""
    hf = Path(sys.executable).parent / "hf"
    done = subprocess.run([str(hf), "download", repo, *args, "--cache-dir", str(store)],
                          env=project.env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def use_store(project, repo: str, revision: str, store: Path) -> None:
    project.write_manifest(f'[model]\nrepo = "{repo}"\nrevision = "{revision}"\n\n[store]\ndownload-dir = "{store}"\n')
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")


def gc(project, *args: str) -> tuple[list[str], str]:
    """Run gc; the store paths it names (removed, or would remove), and its summary line."""
    _, out, err = project.run_vdeploy("gc", *args)
    return sorted(line.split()[-3] for line in out.splitlines() if "remove" in line), err


@pytest.fixture
def two_commits(fake_hub, repo_id) -> tuple[str, str, str]:
    first = fake_hub.commit(repo_id, {"config.json": CONFIG, "README.md": README, "model.safetensors": WEIGHTS_1})
    second = fake_hub.commit(repo_id, {"config.json": CONFIG, "README.md": README, "model.safetensors": WEIGHTS_2})
    return repo_id, first, second


@pytest.fixture
def other_project(make_project):
    return make_project("other")


def test_gc_removes_only_what_a_deleted_lock_pinned_and_keeps_other_tools_files(
    project, other_project, two_commits, fake_hub, tmp_path,
):
    repo, first, second = two_commits
    folder = folder_name(repo)
    store = tmp_path / "shared-store"
    other_repo = f"{repo}-hf"
    fake_hub.commit(other_repo, {"model.safetensors": OTHER})
    # `hf download` came first: a repo of its own, and one file of the commit vdeploy will lock
    hf_download(project, store, other_repo)
    hf_download(project, store, repo, "README.md", "--revision", first)
    use_store(project, repo, first, store)  # the old commit
    use_store(other_project, repo, "main", store)  # the new one: config.json and README.md are the same blobs

    removed, summary = gc(project, "--dry-run")
    assert removed == [] and "2 live root(s), 0 dead" in summary

    project.lock.unlink()
    _, roots, _ = project.run_vdeploy("gc", "--roots")
    assert [line.split()[0] for line in sorted(roots.splitlines())] == ["dead", "live"]
    assert str(project.lock) in next(line for line in roots.splitlines() if line.startswith("dead"))

    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    would, summary = gc(project, "--dry-run")
    expected = sorted([
        f"{folder}/blobs/{sha256(WEIGHTS_1)}",
        f"{folder}/snapshots/{first}/config.json",
        f"{folder}/snapshots/{first}/model.safetensors",
    ])
    assert would == expected
    assert f"would remove 3 file(s), {len(WEIGHTS_1)} bytes" in summary
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before  # a dry run removes nothing

    removed, summary = gc(project)
    assert removed == expected and "1 live root(s), 1 dead" in summary
    assert not (store / f"{folder}/blobs/{sha256(WEIGHTS_1)}").exists()
    # what `hf download` put there stays: its own repo, and its file of the old commit
    assert (store / folder / "snapshots" / first / "README.md").read_bytes() == README
    hub_repo = store / folder_name(other_repo)
    assert next(hub_repo.glob("snapshots/*/model.safetensors")).read_bytes() == OTHER
    # the other project's deployment is whole
    other_project.run_vdeploy("verify", "--full")
    # and the dead root is gone
    _, roots, _ = project.run_vdeploy("gc", "--roots")
    assert [line.split()[0] for line in roots.splitlines()] == ["live"]
    assert gc(project)[0] == []


def test_a_rewritten_lock_keeps_what_it_pins_now(project, other_project, two_commits, tmp_path):
    repo, first, second = two_commits
    store = tmp_path / "store"
    use_store(project, repo, first, store)
    use_store(other_project, repo, "main", store)
    other_project.lock.unlink()  # its root is dead, but the lock below now pins its files
    # the project's lock now says what the other one said (as after a `git checkout`), unfetched
    other_manifest = other_project.manifest.read_text()
    project.manifest.write_text(other_manifest)
    project.run_vdeploy("lock")
    _, roots, _ = project.run_vdeploy("gc", "--roots")
    assert sorted(line.split()[0] for line in roots.splitlines()) == ["dead", "live"]
    removed, _ = gc(project)
    folder = folder_name(repo)
    assert removed == sorted([
        f"{folder}/blobs/{sha256(WEIGHTS_1)}",
        f"{folder}/snapshots/{first}/README.md",
        f"{folder}/snapshots/{first}/config.json",
        f"{folder}/snapshots/{first}/model.safetensors",
    ])
    assert not (store / folder / "snapshots" / first).exists()  # its emptied folder went too
    project.run_vdeploy("verify", "--full")  # what the lock pins now is whole


def test_a_lock_changed_behind_gcs_back_protects_what_it_pins_now(project, other_project, two_commits, tmp_path):
    repo, first, second = two_commits
    store = tmp_path / "store"
    use_store(project, repo, first, store)
    use_store(other_project, repo, "main", store)
    # the other lock's bytes replace this one without any vdeploy command (a `git checkout`)
    project.lock.write_bytes(other_project.lock.read_bytes())
    other_project.lock.unlink()
    _, roots, _ = project.run_vdeploy("gc", "--roots")
    states = {line.split()[0] for line in roots.splitlines()}
    assert states == {"changed", "dead"}
    removed, _ = gc(project)
    assert f"{folder_name(repo)}/blobs/{sha256(WEIGHTS_2)}" not in removed
    assert f"{folder_name(repo)}/blobs/{sha256(WEIGHTS_1)}" in removed


def test_gc_keeps_a_blob_whose_download_holds_its_lock(project, two_commits, tmp_path):
    from vdeploy.store import Store

    repo, first, _ = two_commits
    store = tmp_path / "store"
    use_store(project, repo, first, store)
    project.lock.unlink()
    held = Store(store).named_blob_lock(folder_name(repo), sha256(WEIGHTS_1))
    with held:
        _, out, err = project.run_vdeploy("gc")
    blob = f"{folder_name(repo)}/blobs/{sha256(WEIGHTS_1)}"
    assert f"kept {blob}: a download holds its lock" in err
    assert (store / blob).is_file()
    removed, _ = gc(project)
    assert removed == [blob]


def test_gc_removes_partial_downloads_only_of_blobs_a_dead_lock_wanted(project, two_commits, tmp_path):
    repo, first, _ = two_commits
    store = tmp_path / "store"
    use_store(project, repo, first, store)
    blobs = store / folder_name(repo) / "blobs"
    ours = blobs / f"{sha256(WEIGHTS_2)}.incomplete"  # not pinned by the lock: another tool's
    ours.write_bytes(b"partial")
    killed = blobs / f"{sha256(WEIGHTS_1)}.vdeploy-unbundle-0a1b2c3d"  # a killed unbundle's staging file
    killed.write_bytes(b"partial")
    project.lock.unlink()
    (blobs / f"{sha256(WEIGHTS_1)}.incomplete").write_bytes(b"partial")  # vdeploy's, for the dead lock
    removed, _ = gc(project)
    assert f"{folder_name(repo)}/blobs/{sha256(WEIGHTS_1)}.incomplete" in removed
    assert f"{folder_name(repo)}/blobs/{killed.name}" in removed
    assert ours.read_bytes() == b"partial"


def test_an_edited_placed_log_cannot_make_gc_remove_anything_outside_the_store(project, two_commits, tmp_path):
    repo, first, _ = two_commits
    store = tmp_path / "store"
    use_store(project, repo, first, store)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"keep me")
    # a snapshot folder that is a link out of the store, and log lines that climb out
    escape = store / "models--evil--repo" / "snapshots" / ("0" * 40)
    escape.parent.mkdir(parents=True)
    escape.symlink_to(outside)
    with open(store / ".locks" / "vdeploy" / "placed.log", "a") as log:
        log.write(f"models--evil--repo/snapshots/{'0' * 40}/precious\n../outside/precious\n/etc/hostname\n"
                  f"models--x/blobs/../../../outside/precious\n")
    project.lock.unlink()
    gc(project)
    assert (outside / "precious").read_bytes() == b"keep me"


def test_unbundle_records_its_lock_so_gc_keeps_the_restored_store_until_the_lock_goes(project, make_project, two_commits, tmp_path):
    repo, first, _ = two_commits
    project.write_manifest(f'[model]\nrepo = "{repo}"\nrevision = "{first}"\n\n[chat-template]\ntext = "{{{{ messages }}}}"\n')
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")
    project.run_vdeploy("bundle", "--tar", "-o", tmp_path / "b.tar")
    restored = make_project("restored")
    restored.write_manifest(project.manifest.read_text())
    restored.run_vdeploy("unbundle", tmp_path / "b.tar")
    assert gc(restored, "--dry-run")[0] == []
    restored.lock.unlink()
    # with no manifest in the folder, gc cleans the Hugging Face cache (HF_HOME), the default store
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _, out, err = restored.run_vdeploy("gc", cwd=elsewhere)
    assert f"store {restored.store}" in err
    assert list(restored.store.glob("models--*")) == []  # every file, folder and snapshot of it
    assert list((restored.store / ".locks" / "vdeploy" / "chat-templates").iterdir()) == []
    assert list((restored.store / ".locks" / "vdeploy" / "roots").iterdir()) == []


@needs_engine  # `up --dry-run` checks the installed engine
def test_up_records_its_lock_as_a_root(project, two_commits, tmp_path):
    repo, first, _ = two_commits
    use_store(project, repo, first, tmp_path / "store")
    roots = tmp_path / "store" / ".locks" / "vdeploy" / "roots"
    shutil.rmtree(roots)
    project.run_vdeploy("up", "--dry-run")
    (record,) = roots.iterdir()
    assert json.loads(record.read_text())["lock"] == str(project.lock)


def test_gc_refuses_an_unreadable_root_record(project, two_commits, tmp_path):
    repo, first, _ = two_commits
    use_store(project, repo, first, tmp_path / "store")
    (tmp_path / "store" / ".locks" / "vdeploy" / "roots" / "broken.json").write_text("{")
    _, _, err = project.run_vdeploy("gc", expect=1)
    assert "broken.json: not a readable root record" in error_line(err)
    assert os.path.exists(tmp_path / "store" / folder_name(repo))
