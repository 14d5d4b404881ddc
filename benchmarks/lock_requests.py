"""Benchmark: how many HTTP requests `vdeploy lock` sends, and whether LFS files add any.

Target (issue 2): the request count of `lock` does not grow with the number of LFS files (their
sha256 comes from the one tree listing). Locks, on the tests' fake Hub, a 100-file repo (90 LFS
+ 10 small git files) and a 10-file repo holding the same 10 small files and no LFS file: the
difference between the two counts is what the 90 LFS files cost.

    python benchmarks/lock_requests.py

Always exits 0: benchmarks report, tests assert.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_cli import engine_line  # noqa: E402
from fakehub import FakeHub  # noqa: E402

LFS_FILES = 90
SMALL_FILES = 10


def lock_and_count(hub: FakeHub, repo: str, work: Path) -> tuple[int, collections.Counter]:
    project = work / repo.replace("/", "--")
    project.mkdir(parents=True)
    (project / "vdeploy.toml").write_text(f'[model]\nrepo = "{repo}"\n' + engine_line())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_", "VDEPLOY_"))}
    env.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(work / "home"), HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1", VDEPLOY_CACHE_DIR=str(work / "home"),
    )
    hub.clear_requests()
    done = subprocess.run([sys.executable, "-m", "vdeploy", "lock", str(project)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"vdeploy lock failed:\n{done.stderr}")
    requests = hub.requests
    kinds = collections.Counter(_kind(path) for _, path in requests)
    return len(requests), kinds


def _kind(path: str) -> str:
    for marker in ("/revision/", "/tree/", "/resolve/", "/paths-info/", "/refs"):
        if marker in path:
            return marker.strip("/")
    return path


def main() -> None:
    small = {f"small-{i:02d}.json": f'{{"i": {i}}}\n'.encode() for i in range(SMALL_FILES)}
    lfs = {f"model-{i:05d}.safetensors": i.to_bytes(4, "little") * 4096 for i in range(LFS_FILES)}
    work = Path(tempfile.mkdtemp(prefix="vdeploy-bench-lock-requests-"))
    try:
        with FakeHub() as hub:
            hub.commit("bench/hundred", {**small, **lfs})
            hub.commit("bench/ten", dict(small))
            hundred, hundred_kinds = lock_and_count(hub, "bench/hundred", work)
            ten, ten_kinds = lock_and_count(hub, "bench/ten", work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def show(kinds: collections.Counter) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))

    growth = hundred - ten
    print(f"lock_requests_100_files: {hundred} ({show(hundred_kinds)}) [{LFS_FILES} LFS + {SMALL_FILES} small]")
    print(f"lock_requests_10_files: {ten} ({show(ten_kinds)}) [0 LFS + {SMALL_FILES} small]")
    print(f"lock_requests_per_small_file: {ten_kinds['resolve'] / SMALL_FILES:.1f} (information: small git files are downloaded and hashed)")
    print(
        f"lock_requests_added_by_{LFS_FILES}_lfs_files: {growth} "
        f"(target: 0, the count does not grow with LFS files) {'PASS' if growth == 0 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
