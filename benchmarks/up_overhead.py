"""vdeploy's own cost before vLLM starts, beside its targets (issue: `vdeploy up`).

Targets: `vdeploy plan` and `vdeploy up --dry-run` on a verified store take under 0.3 s wall, and
that cost is under 5% of the time from `vdeploy up` to a healthy server for the tiny example.

Run from the repository root, after scripts/setup:
    .venv/bin/python benchmarks/up_overhead.py [--runs 7] [--no-launch]
It copies examples/tiny to a temporary folder, builds the model there, locks nothing (the
committed lock is used), and launches vLLM once unless --no-launch is given.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_cli import copy_tiny_example

PLAN_TARGET_SECONDS = 0.3
SHARE_TARGET = 0.05


def wall(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def median_wall(argv: list[str], cwd: Path, runs: int) -> float:
    wall(argv, cwd)  # warm the page cache and the catalogue cache
    return statistics.median(wall(argv, cwd) for _ in range(runs))


def time_to_healthy(vdeploy: list[str], folder: Path) -> float:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    process = subprocess.Popen([*vdeploy, "up", "--port", str(port), str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if process.poll() is not None:
                raise SystemExit(f"vdeploy up exited with {process.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - start
            except OSError:
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-launch", action="store_true", help="skip the launch (the 5%% share)")
    args = parser.parse_args()

    vdeploy = [sys.executable, "-m", "vdeploy"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_tiny_example(Path(tmp))

        help_seconds = median_wall([*vdeploy, "--help"], folder, args.runs)
        plan_seconds = median_wall([*vdeploy, "plan", str(folder)], folder, args.runs)
        dry_seconds = median_wall([*vdeploy, "up", "--dry-run", str(folder)], folder, args.runs)
        print(f"vdeploy --help (start-up alone): {help_seconds:.3f} s (median of {args.runs})")
        for name, seconds in (("plan", plan_seconds), ("up --dry-run", dry_seconds)):
            verdict = "PASS" if seconds < PLAN_TARGET_SECONDS else "FAIL"
            print(f"{name}: {seconds:.3f} s wall (target: < {PLAN_TARGET_SECONDS} s) {verdict}")
        if not args.no_launch:
            healthy = time_to_healthy(vdeploy, folder)
            share = dry_seconds / healthy
            verdict = "PASS" if share < SHARE_TARGET else "FAIL"
            print(f"up → healthy: {healthy:.1f} s; vdeploy's share {share:.1%} (target: < {SHARE_TARGET:.0%}) {verdict}")


if __name__ == "__main__":
    main()
