"""Benchmark: `vdeploy diff` of two 1,000-file locks, the whole process, against CLI start-up.

Target (issue 11): median wall time of `vdeploy diff A B` ≤ 3 × median of `vdeploy --help`.
The locks come from a local folder that `vdeploy lock` imports: the first as locked, the second
after 10 files changed and one was added, so the diff has differences to report (exit 1).

    python benchmarks/diff_speed.py [--files 1000] [--runs 7]

Always exits 0: benchmarks report, tests assert.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from bench_cli import cli_env, file_count_arguments, lock_checkpoint_folder, timed_vdeploy

TARGET_RATIO = 3.0
CHANGED = 10


def build_locks(root: Path, files: int, env: dict[str, str]) -> tuple[Path, Path]:
    lock_checkpoint_folder(root, files, env)
    before = Path(shutil.copy(root / "vdeploy.lock", root / "before.lock"))
    ckpt = root / "ckpt"
    for index in range(CHANGED):
        (ckpt / f"part-{index:02d}" / f"file-{index * 100:04d}.json").write_text(f'{{"index": {index}, "v": 2}}\n')
    (ckpt / "added.json").write_text("{}\n")
    timed_vdeploy(["lock", str(root)], env)
    return before, root / "vdeploy.lock"


def main() -> None:
    args = file_count_arguments(__doc__)

    work = Path(tempfile.mkdtemp(prefix="vdeploy-bench-diff-"))
    try:
        env = cli_env(work / "home")
        before, after = build_locks(work / "project", args.files, env)
        command = ["diff", str(before), str(after)]
        timed_vdeploy(command, env, expect=1)  # warm the page cache and the import caches

        # Interleaved, so drifting machine load hits both series alike.
        diff_times, help_times, cold_times = [], [], []
        for run in range(args.runs):
            diff_times.append(timed_vdeploy(command, env, expect=1))
            help_times.append(timed_vdeploy(["--help"], env))
            # Without the parsed-lock cache `lock` leaves: both locks parsed from TOML.
            cold = {**env, "VDEPLOY_CACHE_DIR": str(work / f"empty-cache-{run}")}
            cold_times.append(timed_vdeploy(command, cold, expect=1))
        diff_median = statistics.median(diff_times)
        help_median = statistics.median(help_times)
        cold_median = statistics.median(cold_times)
        ratio = diff_median / help_median
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        print(f"locks: {args.files} files each, {CHANGED} changed and 1 added")
        print(f"diff_median: {diff_median:.3f} s over {args.runs} runs")
        print(f"help_median: {help_median:.3f} s (CLI start-up)")
        print(f"diff_without_parse_cache_median: {cold_median:.3f} s (information: both locks parsed from TOML, "
              f"{cold_median / help_median:.2f} × --help)")
        print(f"diff_vs_help: {ratio:.2f} × (target: ≤ {TARGET_RATIO:.0f} ×) {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
