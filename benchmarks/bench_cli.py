"""What the benchmarks share: the CLI in a subprocess, timed, a locked local-folder project, and a copy
of the tiny example."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# Start-up is measured as users have it, with compiled bytecode cached: a caller's
# PYTHONDONTWRITEBYTECODE would make every timed process compile vdeploy from source again.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

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


def engine_line() -> str:
    """[runtime] engine for a benchmark manifest: the installed engine, else one named for the lock."""
    from vdeploy.engine import installed_engine

    running = installed_engine()
    return f'\n[runtime]\nengine = "{running.spec if running is not None else "vllm==0.0.0"}"\n'


def lock_local_folder(root: Path, env: dict[str, str]) -> None:
    """Lock root/ckpt as a local source, which imports its files into root/store."""
    (root / "vdeploy.toml").write_text(LOCAL_MANIFEST + engine_line())
    timed_vdeploy(["lock", str(root)], env)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_store(root: Path, shards: int, shard_bytes: int, env: dict[str, str]) -> list[Path]:
    """A local-folder manifest of `shards` files, locked (which imports them into root/store)."""
    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True)
    block = os.urandom(16 * 1024 * 1024)
    for index in range(shards):
        with open(ckpt / f"model-{index + 1:05d}-of-{shards:05d}.safetensors", "wb") as out:
            written = 0
            while written < shard_bytes:
                chunk = block[: shard_bytes - written]
                # Vary each shard so no two are the same blob.
                out.write(index.to_bytes(4, "little") + chunk[4:])
                written += len(chunk)
    (ckpt / "config.json").write_text('{"architectures": ["Synthetic"]}\n')
    lock_local_folder(root, env)
    shutil.rmtree(ckpt)  # the store holds its own copies now
    return sorted((root / "store").glob("models--*/blobs/*"))


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


def copy_tiny_example(base: Path, build: bool = True) -> Path:
    """examples/tiny under `base` with its committed lock and the constraints it names
    (../../constraints, as in the repository); with build, its model built and fetched.
    Returns the example's folder."""
    import shutil

    root = Path(__file__).resolve().parents[1]
    folder = base / "examples" / "tiny"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("vdeploy.toml", "vdeploy.lock"):
        shutil.copy(root / "examples" / "tiny" / name, folder / name)
    shutil.copytree(root / "constraints", base / "constraints", dirs_exist_ok=True)
    if build:
        subprocess.run([sys.executable, str(root / "examples" / "tiny" / "build_model.py"), str(folder / "model")], check=True)
        subprocess.run([sys.executable, "-m", "vdeploy", "fetch", str(folder)], check=True, stderr=subprocess.DEVNULL)
    return folder
