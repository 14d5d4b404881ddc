"""The engine closure (lock format 2): a lock pins what the manifest names about the engine and
nothing of the machine that made it; `up` checks every pin; `engine freeze` writes the pins.

The byte-identity test locks the same manifest with two real interpreters: this one and a fresh
venv holding vdeploy without vLLM (made once per session; about 30 s of pip from the registry).
"""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from vdeploy.engine import installed_engine
from vdeploy.lockfile import loads_lock

ROOT = Path(__file__).resolve().parents[1]
ENGINE = installed_engine()
needs_engine = pytest.mark.skipif(ENGINE is None, reason="needs the vLLM engine: run scripts/setup")

WEIGHTS = b"\0" * 4096


def local_model(project) -> None:
    weights = project.folder / "weights"
    weights.mkdir(exist_ok=True)
    (weights / "config.json").write_bytes(b'{"architectures": ["LlamaForCausalLM"]}\n')
    (weights / "model.safetensors").write_bytes(WEIGHTS)


def manifest(runtime: str) -> str:
    return f'[model]\npath = "weights"\n\n[serve]\nmax-model-len = 128\n\n[runtime]\n{runtime}\n\n[store]\ndownload-dir = "store"\n'


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="session")
def engineless_python(tmp_path_factory) -> str:
    """A Python with vdeploy (this checkout) installed and no vLLM."""
    if installed_engine() is None:
        return sys.executable  # this one already has none
    folder = tmp_path_factory.mktemp("engineless") / "venv"
    venv.create(folder, with_pip=True)
    python = str(folder / "bin" / "python")
    done = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "-e", str(ROOT)], capture_output=True, text=True, timeout=600,
    )
    if done.returncode != 0:
        pytest.skip(f"could not install vdeploy into a venv without vLLM: {done.stderr.strip().splitlines()[-1:]}")
    return python


def lock_with(project, python: str) -> bytes:
    project.lock.unlink(missing_ok=True)
    done = subprocess.run(
        [python, "-m", "vdeploy", "lock"], cwd=project.folder, env=project.env(), capture_output=True, text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return project.lock.read_bytes()


@needs_engine
@pytest.mark.parametrize("pinned", ["engine", "engine-environment"])
def test_the_same_manifest_locks_to_the_same_bytes_with_and_without_the_engine(project, engineless_python, pinned):
    local_model(project)
    if pinned == "engine":
        runtime = f'engine = "{ENGINE.spec}"'
    else:
        project.run_vdeploy("engine", "freeze", "engine.txt")
        runtime = 'engine-environment = "engine.txt"'
    project.write_manifest(manifest(runtime), engine=False)
    with_engine = lock_with(project, sys.executable)
    without_engine = lock_with(project, engineless_python)
    assert with_engine == without_engine
    lock = loads_lock(with_engine.decode())
    assert (lock.engine.distribution, lock.engine.version) == (ENGINE.distribution, ENGINE.version)
    if pinned == "engine-environment":
        assert lock.engine.pins["torch"] == ENGINE.packages["torch"]
        assert lock.engine.environment.file == "engine.txt"
    else:
        assert lock.engine.environment is None and set(lock.engine.pins) == {ENGINE.distribution}
    # nothing read off the machine that locked: no library versions outside the named pins
    assert b"source" not in with_engine.split(b"[runtime]")[0]


def test_a_manifest_naming_no_engine_is_refused_at_lock_naming_what_to_write(project):
    local_model(project)
    project.write_manifest(manifest("seed = 0"), engine=False)
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = error_line(err)
    assert "[runtime] engine is not set" in line and 'add engine = "vllm==<version>"' in line
    if ENGINE is not None:
        assert f'installed here: engine = "{ENGINE.spec}"' in line


@needs_engine
def test_freeze_then_lock_then_up_accepts_this_machine(project):
    local_model(project)
    _, _, err = project.run_vdeploy("engine", "freeze", "engine.txt")
    text = (project.folder / "engine.txt").read_text()
    assert f"{ENGINE.spec}" in text and f"torch=={ENGINE.packages['torch']}" in text
    assert "pytest==" not in text  # test tools are not part of the engine
    project.write_manifest(manifest('engine-environment = "engine.txt"'), engine=False)
    project.run_vdeploy("lock")
    _, out, err = project.run_vdeploy("up", "--dry-run")
    assert "warning" not in err and "not pinned" not in err
    pins = len(loads_lock(project.lock.read_text()).engine.pins)
    assert f"# engine {ENGINE.spec} with {pins - 1} more packages pinned" in out


@needs_engine
def test_a_pinned_package_other_than_the_installed_one_is_refused_naming_both_versions(project):
    local_model(project)
    torch = ENGINE.packages["torch"]
    (project.folder / "engine.txt").write_text(f"{ENGINE.spec}\ntorch==9.9.9\nnumpy=={ENGINE.packages['numpy']}\n")
    project.write_manifest(manifest('engine-environment = "engine.txt"'), engine=False)
    project.run_vdeploy("lock")
    _, _, err = project.run_vdeploy("up", "--dry-run", expect=1)
    line = error_line(err)
    assert f"torch 9.9.9 locked, {torch} installed" in line and "numpy" not in line
    assert "--allow-engine-drift" in line
    _, out, err = project.run_vdeploy("up", "--dry-run", "--allow-engine-drift")
    assert f"engine drift allowed: torch 9.9.9 locked, {torch} installed" in err
    # a changed environment file makes the lock stale, like any manifest input
    (project.folder / "engine.txt").write_text(f"{ENGINE.spec}\ntorch=={torch}\n")
    _, _, err = project.run_vdeploy("up", "--dry-run", expect=1)
    assert "stale" in error_line(err) and "engine-environment" in error_line(err)


@needs_engine
def test_an_engine_pinned_alone_is_run_with_one_line_saying_the_rest_is_not_pinned(project):
    local_model(project)
    project.write_manifest(manifest(f'engine = "{ENGINE.spec}"'), engine=False)
    project.run_vdeploy("lock")
    _, _, err = project.run_vdeploy("up", "--dry-run")
    notes = [line for line in err.splitlines() if "not the rest of its environment" in line]
    assert len(notes) == 1 and "engine-environment" in notes[0]


def test_an_environment_file_that_is_not_exact_pins_is_one_line_naming_file_and_line(project):
    local_model(project)
    (project.folder / "engine.txt").write_text("# pins\nvllm==0.32.0\ntorch>=2.13\n")
    project.write_manifest(manifest('engine-environment = "engine.txt"'), engine=False)
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = error_line(err)
    assert f"{project.folder / 'engine.txt'}:3: 'torch>=2.13' is not an exact pin" in line


def test_an_engine_image_must_be_pinned_by_digest(project):
    local_model(project)
    project.write_manifest(manifest('engine = "vllm==0.32.0"\nengine-image = "vllm/vllm-openai:v0.32.0"'), engine=False)
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "engine-image" in error_line(err) and "not pinned by digest" in error_line(err)
    image = "docker.io/vllm/vllm-openai@sha256:" + "ab" * 32
    project.write_manifest(manifest(f'engine = "vllm==0.32.0"\nengine-image = "{image}"'), engine=False)
    project.run_vdeploy("lock")
    assert loads_lock(project.lock.read_text()).engine.image == image


def test_a_format_1_lock_is_refused_with_a_hint_and_relocked_keeping_its_commits(project, fake_hub, repo_id):
    commit = fake_hub.commit(repo_id, {"config.json": b"{}\n", "model.safetensors": WEIGHTS})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    text = project.lock.read_text()
    lock = loads_lock(text)
    # the same lock as format 1 wrote it: the engine as found where lock ran
    engine = f'[engine]\ndistribution = "{lock.engine.distribution}"\nversion = "{lock.engine.version}"\n'
    old = text.replace("version = 2\n", "version = 1\n", 1).split("[engine]")[0] + (
        engine + 'source = "installed"\ntorch = "2.13.0+cpu"\n\n' + "[runtime]" + text.split("[runtime]", 1)[1]
    )
    project.lock.write_text(old)
    fake_hub.commit(repo_id, {"config.json": b'{"moved": true}\n'})
    _, _, err = project.run_vdeploy("plan", expect=1)
    assert "lock format 1 is older" in error_line(err) and "run `vdeploy lock`" in error_line(err)
    project.run_vdeploy("lock")
    relocked = loads_lock(project.lock.read_text())
    assert relocked.model.commit == commit  # the upstream push did not move it
    assert project.lock.read_text() == text
