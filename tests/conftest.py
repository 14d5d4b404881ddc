"""Shared fixtures: one fake Hub per session, and a project folder with the real CLI beside it."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fakehub import FakeHub

from manifests import pin_engine


@pytest.fixture(scope="session")
def fake_hub():
    """A fake Hub shared by the session; tests keep to their own repo ids (see `repo_id`)."""
    with FakeHub() as hub:
        yield hub


@pytest.fixture
def repo_id(request) -> str:
    """A repo id unique to this test, so tests sharing the hub never see each other's repos."""
    # The Hub's rules: [A-Za-z0-9._-], no "--" or "..", at most 96 characters, no edge - or ".
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name)[:60].strip("-")
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    return f"test/{name}-{digest}"


@pytest.fixture(scope="session")
def vdeploy_cache(tmp_path_factory) -> Path:
    """vdeploy's cache (the engine's flag catalogue), shared by the session: it is keyed by engine version.

    The installed engine's catalogue is probed into it here, once and with no time limit (it imports
    vLLM: 10 s on a quiet machine, a minute on a busy one), not by whichever CLI call a test makes first.
    """
    cache = tmp_path_factory.mktemp("vdeploy-cache")
    from vdeploy.engine import installed_engine
    from vdeploy.probe import load_catalogue

    running = installed_engine()
    if running is not None:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("VDEPLOY_CACHE_DIR", str(cache))
            load_catalogue(running.spec)
    return cache


@dataclass
class Project:
    """A temporary project folder, and the vdeploy CLI run in a subprocess against the fake Hub."""

    folder: Path
    home: Path
    hub: FakeHub
    cache: Path

    @property
    def manifest(self) -> Path:
        return self.folder / "vdeploy.toml"

    @property
    def lock(self) -> Path:
        return self.folder / "vdeploy.lock"

    @property
    def store(self) -> Path:
        """The default store: the Hugging Face cache under this project's HF_HOME."""
        return self.home / "hub"

    def write_manifest(self, text: str, engine: bool = True) -> Path:
        """Write vdeploy.toml; engine=True adds [runtime] engine = TEST_ENGINE unless it names one."""
        self.manifest.write_text(pin_engine(text) if engine else text, encoding="utf-8")
        return self.manifest

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "VDEPLOY_"))}
        env.update(
            HF_ENDPOINT=self.hub.url,
            HF_HOME=str(self.home),
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            VDEPLOY_CACHE_DIR=str(self.cache),
        )
        env.update(extra or {})
        return env

    def run_vdeploy(
        self, *args: str, env: dict[str, str] | None = None, expect: int | None = 0, cwd: Path | None = None,
        timeout: float = 60,
    ) -> tuple[int, str, str]:
        """Run `python -m vdeploy *args`; check the exit code unless expect is None."""
        done = subprocess.run(
            [sys.executable, "-m", "vdeploy", *map(str, args)],
            cwd=cwd or self.folder,
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if expect is not None:
            assert done.returncode == expect, (
                f"vdeploy {' '.join(map(str, args))}: exit {done.returncode}, expected {expect}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done.returncode, done.stdout, done.stderr


@pytest.fixture
def project(tmp_path, fake_hub, vdeploy_cache) -> Project:
    folder = tmp_path / "project"
    home = tmp_path / "home"
    folder.mkdir()
    home.mkdir()
    return Project(folder=folder, home=home, hub=fake_hub, cache=vdeploy_cache)


@pytest.fixture(scope="session")
def make_project(tmp_path_factory, fake_hub, vdeploy_cache):
    """Projects for fixtures wider than one test (a module's shared server): make_project("name")."""

    def make(name: str = "project") -> Project:
        base = tmp_path_factory.mktemp(name)
        (base / "project").mkdir()
        (base / "home").mkdir()
        return Project(folder=base / "project", home=base / "home", hub=fake_hub, cache=vdeploy_cache)

    return make


@pytest.fixture
def run_vdeploy(project):
    """The CLI of `project`, as a function: run_vdeploy(*args, env=..., expect=0)."""
    return project.run_vdeploy
