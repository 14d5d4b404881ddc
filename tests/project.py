"""A project folder for tests, and the vdeploy CLI run in a subprocess against the fake Hub.

A module of its own, not conftest.py: tests/ and tests/e2e/ each have a conftest module, so
`from conftest import ...` finds whichever pytest loaded last.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fakehub import FakeHub
from manifests import pin_engine


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
