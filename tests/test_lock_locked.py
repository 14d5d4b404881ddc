"""`vdeploy lock --locked` (for CI, as `uv lock --locked`): exit 0 when the lock is current, exit 1 in
one line when locking would change it; it never writes. And `lock` where the named engine's flags
are not known here (a laptop without vLLM): static checks only, and it says which it skipped.
"""

from __future__ import annotations

import os
from pathlib import Path

MODEL = {"config.json": b'{"architectures": ["LlamaForCausalLM"]}\n', "model.safetensors": b"\3" * 4096}


def one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def tree(*roots: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every file and link under roots: (size, mtime, bytes or link target), to see any write."""
    found = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = Path(folder) / name
                info = path.lstat()
                content = os.readlink(path) if path.is_symlink() else path.read_bytes()
                found[str(path)] = (info.st_size, info.st_mtime_ns, content)
    return found


def manifest(repo: str, serve: str = "max-model-len = 128") -> str:
    return f'[model]\nrepo = "{repo}"\n\n[serve]\n{serve}\n'


def test_locked_exits_0_and_writes_nothing_when_the_lock_is_current(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, MODEL)
    project.write_manifest(manifest(repo_id))
    project.run_vdeploy("lock")
    # Upstream moves on: the lock keeps its pins, so it is still current.
    fake_hub.commit(repo_id, {"config.json": b"{}\n"})
    before = tree(project.folder, project.home)
    _, out, err = project.run_vdeploy("lock", "--locked")
    assert f"up to date: {project.lock}" in err and out == ""
    assert tree(project.folder, project.home) == before


def test_locked_exits_1_in_one_line_when_the_manifest_changed_and_writes_nothing(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, MODEL)
    project.write_manifest(manifest(repo_id))
    project.run_vdeploy("lock")
    project.write_manifest(manifest(repo_id, "max-model-len = 256"))
    before = tree(project.folder, project.home)
    _, _, err = project.run_vdeploy("lock", "--locked", expect=1)
    line = one_error(err)
    assert str(project.lock) in line and "locking would change the lock" in line
    assert "max-model-len" in line and "run `vdeploy lock`" in line
    assert tree(project.folder, project.home) == before


def test_locked_exits_1_in_one_line_when_there_is_no_lock_and_writes_nothing(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, MODEL)
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", "--locked", expect=1)
    line = one_error(err)
    assert str(project.lock) in line and "there is none" in line
    assert not project.lock.exists()
    assert not project.store.exists()  # lock keeps the small files it read; --locked must not


def test_lock_without_the_named_engines_flags_makes_the_static_checks_and_says_what_it_skipped(
    project, fake_hub, repo_id
):
    # An engine neither installed nor cached here, as on a laptop locking for a GPU server.
    fake_hub.commit(repo_id, MODEL)
    project.write_manifest(manifest(repo_id, 'some-future-flag = 3\nserved-model-name = "m"') + '\n[runtime]\nengine = "vllm==0.0.1"\n')
    _, _, err = project.run_vdeploy("lock")
    assert "skipped: flag names and types" in err and f"wrote {project.lock}" in err
    lock_text = project.lock.read_text()
    assert 'version = "0.0.1"' in lock_text and "some-future-flag = 3" in lock_text
    assert 'served-model-name = "m"' in lock_text  # as written, whatever the engine makes of it

    project.write_manifest(manifest(repo_id, "tp = 2") + '\n[runtime]\nengine = "vllm==0.0.1"\n')
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "short form of tensor-parallel-size" in one_error(err)
