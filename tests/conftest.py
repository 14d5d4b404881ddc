"""Shared fixtures: one fake Hub per session, and a project folder with the real CLI beside it."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from fakehub import FakeHub
from project import Project


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
