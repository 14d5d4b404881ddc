"""The examples people copy: their manifests parse, and the tiny model's script makes the locked bytes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from vdeploy.lockfile import loads_lock
from vdeploy.manifest import load_manifest

from needs import needs_engine

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_the_tiny_build_script_reproduces_exactly_the_bytes_its_lock_pins(tmp_path):
    sys.path.insert(0, str(EXAMPLES / "tiny"))
    from build_model import build_model

    build_model(tmp_path)
    lock = loads_lock((EXAMPLES / "tiny" / "vdeploy.lock").read_text())
    built = {
        p.relative_to(tmp_path).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in tmp_path.rglob("*") if p.is_file()
    }
    assert built == {f.path: (f.size, f.sha256) for f in lock.model.files}


@needs_engine
def test_every_example_manifest_loads_and_its_flags_pass_the_engine(monkeypatch, vdeploy_cache):
    from vdeploy.engine import installed_engine
    from vdeploy.flags import check_serve
    from vdeploy.probe import load_catalogue

    running = installed_engine()
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(vdeploy_cache))
    catalogue = load_catalogue(running.spec)
    manifests = sorted(EXAMPLES.glob("*/vdeploy.toml"))
    assert {p.parent.name for p in manifests} >= {"tiny", "all-flags", "qwen3", "multi-gpu"}
    for path in manifests:
        manifest = load_manifest(path)
        checked, skipped = check_serve(manifest.serve, catalogue, manifest)
        assert skipped == [] and checked.keys() == manifest.serve.keys()


def quick_start(project) -> Path:
    """The tiny example in the repository's layout (it names ../../constraints/engine-cpu.txt), built."""
    import shutil

    sys.path.insert(0, str(EXAMPLES / "tiny"))
    from build_model import build_model

    tiny = project.folder / "examples" / "tiny"
    tiny.mkdir(parents=True)
    for name in ("vdeploy.toml", "vdeploy.lock"):
        shutil.copy(EXAMPLES / "tiny" / name, tiny / name)
    shutil.copytree(EXAMPLES.parent / "constraints", project.folder / "constraints")
    build_model(tiny / "model")
    return tiny


def test_the_quick_start_lock_is_current_and_its_store_fills_from_the_built_model(project):
    tiny = quick_start(project)
    committed = (tiny / "vdeploy.lock").read_bytes()
    project.run_vdeploy("lock", "--locked", tiny)
    _, _, err = project.run_vdeploy("fetch", tiny)
    assert "imported model: model.safetensors" in err
    project.run_vdeploy("verify", "--full", tiny)
    _, out, _ = project.run_vdeploy("plan", tiny)
    assert f"# deployment {loads_lock(committed.decode()).deployment}" in out
    assert (tiny / "vdeploy.lock").read_bytes() == committed


@needs_engine
def test_the_quick_start_up_dry_run_fills_the_store_and_prints_the_plan(project):
    tiny = quick_start(project)
    _, out, err = project.run_vdeploy("up", "--dry-run", tiny)
    lock = loads_lock((tiny / "vdeploy.lock").read_text())
    assert f"# deployment {lock.deployment}" in out
    assert "imported model: model.safetensors" in err
    project.run_vdeploy("verify", "--full", tiny)
