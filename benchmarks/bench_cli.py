"""What the benchmarks share: the CLI in a subprocess, timed, a locked local-folder project, and a copy
of the tiny example."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

LOCAL_MANIFEST = '[model]\npath = "ckpt"\n\n[store]\ndownload-dir = "store"\n'


def cli_env(home: Path) -> dict[str, str]:
    """The caller's environment without its Hugging Face or vdeploy settings, homed in `home`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "VDEPLOY_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", VDEPLOY_CACHE_DIR=str(home))
    return env


def timed_vdeploy(args: list[str], env: dict[str, str], expect: int = 0) -> float:
    """Wall seconds of `python -m vdeploy ARGS`; stops the benchmark if it exits otherwise than expected."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "vdeploy", *args], env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if done.returncode != expect:
        raise SystemExit(f"vdeploy {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return elapsed


def lock_local_folder(root: Path, env: dict[str, str]) -> None:
    """Lock root/ckpt as a local source, which imports its files into root/store."""
    from vdeploy.engine import installed_engine

    manifest = LOCAL_MANIFEST
    if installed_engine() is None:
        manifest += '\n[runtime]\nengine = "vllm==0.0.0"\n'
    (root / "vdeploy.toml").write_text(manifest)
    timed_vdeploy(["lock", str(root)], env)


def copy_tiny_example(folder: Path, build: bool = True) -> None:
    """examples/tiny in `folder` with its committed lock; with build, its model built and fetched."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vdeploy.toml", "vdeploy.lock"):
        shutil.copy(root / "examples" / "tiny" / name, folder / name)
    if build:
        subprocess.run([sys.executable, str(root / "examples" / "tiny" / "build_model.py"), str(folder / "model")], check=True)
        subprocess.run([sys.executable, "-m", "vdeploy", "fetch", str(folder)], check=True, stderr=subprocess.DEVNULL)
