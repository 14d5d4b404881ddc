"""The examples people copy: their manifests parse, and the tiny model's script makes the locked bytes."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from vdeploy.lockfile import loads_lock
from vdeploy.manifest import load_manifest

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


def test_every_example_manifest_loads_and_its_flags_pass_the_engine(monkeypatch, vdeploy_cache):
    import pytest

    from vdeploy.engine import installed_engine
    from vdeploy.flags import check_serve
    from vdeploy.probe import load_catalogue

    running = installed_engine()
    if running is None:
        pytest.skip("needs vLLM installed")
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(vdeploy_cache))
    catalogue = load_catalogue(running.spec)
    manifests = sorted(EXAMPLES.glob("*/vdeploy.toml"))
    assert {p.parent.name for p in manifests} >= {"tiny", "all-flags", "qwen3", "multi-gpu"}
    for path in manifests:
        manifest = load_manifest(path)
        checked, skipped = check_serve(manifest.serve, catalogue, manifest)
        assert skipped == [] and checked.keys() == manifest.serve.keys()


def test_the_quick_start_lock_is_current_and_its_store_fills_from_the_built_model(project):
    import shutil

    sys.path.insert(0, str(EXAMPLES / "tiny"))
    from build_model import build_model

    # The repository's layout: the example names ../../constraints/engine-cpu.txt.
    tiny = project.folder / "examples" / "tiny"
    tiny.mkdir(parents=True)
    for name in ("vdeploy.toml", "vdeploy.lock"):
        shutil.copy(EXAMPLES / "tiny" / name, tiny / name)
    shutil.copytree(EXAMPLES.parent / "constraints", project.folder / "constraints")
    build_model(tiny / "model")
    _, out, err = project.run_vdeploy("up", "--dry-run", tiny)
    lock = loads_lock((tiny / "vdeploy.lock").read_text())
    assert f"# deployment {lock.deployment}" in out
    assert "imported model: model.safetensors" in err
    project.run_vdeploy("verify", "--full", tiny)
