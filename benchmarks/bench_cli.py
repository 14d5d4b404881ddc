"""What the benchmarks share: the CLI in a subprocess, timed, a locked local-folder project, and a copy
of the tiny example."""

from __future__ import annotations

import argparse
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

    # `lock` pins the engine the manifest names: the one installed here, else any.
    installed = installed_engine()
    manifest = LOCAL_MANIFEST + f'\n[runtime]\nengine = "{installed.spec if installed else "vllm==0.0.0"}"\n'
    (root / "vdeploy.toml").write_text(manifest)
    timed_vdeploy(["lock", str(root)], env)


def file_count_arguments(doc: str) -> argparse.Namespace:
    """--files (default 1,000) and --runs (default 7), the options of the 1,000-file benchmarks."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=7)
    return parser.parse_args()


def lock_checkpoint_folder(root: Path, files: int, env: dict[str, str]) -> None:
    """root/ckpt holding `files` small distinct files, nested like a real checkpoint folder,
    locked as a local source (part-XX/file-NNNN.json, 100 to a folder)."""
    ckpt = root / "ckpt"
    for index in range(files):
        path = ckpt / f"part-{index // 100:02d}" / f"file-{index:04d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f'{{"index": {index}}}\n')
    lock_local_folder(root, env)


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
