"""`vdeploy export` is pure (lock + options → documents): the whole process, beside its target.

Target (issue: export): every format's `vdeploy export` takes at most 3 × `vdeploy --help`
(medians, wall time, Python start-up included).

Run from the repository root:
    .venv/bin/python benchmarks/export_speed.py [--runs 11]
It exports the committed examples/tiny lock (no Hub, no engine) into a temporary folder. Both
sides run as an installed vdeploy does, with compiled bytecode (PYTHONDONTWRITEBYTECODE is dropped).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cli import cli_env, timed_vdeploy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_FACTOR = 3.0
IMAGE = "registry.example.com/vllm-cpu-vdeploy@sha256:" + "0" * 64
FORMATS = {
    "k8s": ["--image", IMAGE],
    "lws": ["--image", IMAGE],
    "compose": ["--image", IMAGE],
    "systemd": [],
}


def median_seconds(args: list[str], env: dict[str, str], runs: int) -> float:
    timed_vdeploy(args, env)  # warm the page cache
    return statistics.median(timed_vdeploy(args, env) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as scratch:
        env = cli_env(Path(scratch) / "home")
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        help_time = median_seconds(["--help"], env, runs)
        limit = TARGET_FACTOR * help_time
        print(f"vdeploy --help: {help_time:.3f} s (median of {runs}); target for export: <= {limit:.3f} s")
        worst = 0.0
        for fmt, options in FORMATS.items():
            out = Path(scratch) / fmt
            seconds = median_seconds(["export", fmt, str(ROOT / "examples" / "tiny"), "-o", str(out), *options], env, runs)
            worst = max(worst, seconds)
            verdict = "ok" if seconds <= limit else "OVER"
            print(f"vdeploy export {fmt:<8} {seconds:.3f} s = {seconds / help_time:.2f} x --help  [{verdict}]")
        print(f"slowest: {worst:.3f} s vs target {limit:.3f} s: {'met' if worst <= limit else 'MISSED'}")


if __name__ == "__main__":
    main()
