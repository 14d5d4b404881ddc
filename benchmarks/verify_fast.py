"""Benchmark: fast `vdeploy verify` of a 1,000-file lock, beyond the CLI's own start-up.

Target (issue 2): median wall time of `vdeploy verify` minus median of `vdeploy --help` < 0.1 s.
The files come from a local folder that `vdeploy lock` imports (and fingerprints) into the store,
so the fast path trusts each file's recorded fingerprint and reads none of them.

    python benchmarks/verify_fast.py [--files 1000] [--runs 7]

Always exits 0: benchmarks report, tests assert.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

from bench_cli import cli_env, file_count_arguments, lock_checkpoint_folder, timed_vdeploy

TARGET_SECONDS = 0.1


def main() -> None:
    args = file_count_arguments(__doc__)

    work = Path(tempfile.mkdtemp(prefix="vdeploy-bench-verify-fast-"))
    try:
        env = cli_env(work / "home")
        project = work / "project"
        lock_checkpoint_folder(project, args.files, env)
        timed_vdeploy(["verify", str(project)], env)  # warm the page cache and the import caches

        # Interleaved, so drifting machine load hits both series alike.
        verify_times, help_times, parse_times = [], [], []
        nowhere = str(work / "no-such-folder")
        for _ in range(args.runs):
            verify_times.append(timed_vdeploy(["verify", str(project)], env))
            help_times.append(timed_vdeploy(["--help"], env))
            # The same command, failing right after typer has parsed its arguments.
            parse_times.append(timed_vdeploy(["verify", nowhere], env, expect=1))
        verify_median = statistics.median(verify_times)
        help_median = statistics.median(help_times)
        parse_median = statistics.median(parse_times)
        beyond = verify_median - help_median

        full = timed_vdeploy(["verify", "--full", str(project)], env)
        verdict = "PASS" if beyond < TARGET_SECONDS else "FAIL"
        print(f"lock: {args.files} files")
        print(f"verify_fast_median: {verify_median:.3f} s over {args.runs} runs")
        print(f"help_median: {help_median:.3f} s (CLI start-up)")
        print(f"verify_full_once: {full:.3f} s (information: the same lock, every file re-hashed)")
        print(
            f"verify_argument_parsing_median: {parse_median:.3f} s (information: `vdeploy verify <missing folder>`, "
            f"{parse_median - help_median:+.3f} s over --help: argument parsing and the manifest lookup)"
        )
        print(
            f"verify_fast_beyond_argument_parsing: {verify_median - parse_median:.3f} s "
            f"(information: the verify work itself: read manifest and lock, stat {args.files} files)"
        )
        print(f"verify_fast_beyond_startup: {beyond:.3f} s (target: < {TARGET_SECONDS} s) {verdict}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
