"""What typer's shell completion (`--install-completion`, `--show-completion`) costs `vdeploy --help`.

Target (issue 8): completion is enabled only if it adds less than 20 ms to `vdeploy --help`.

Run from the repository root:
    .venv/bin/python benchmarks/completion_cost.py [--runs 41]
It copies the vdeploy package twice into a temporary folder, one copy with add_completion=False and
one with add_completion=True, and times `python -m vdeploy --help` from each, alternating, so both
see the same machine load. Prints the medians and their difference beside the target.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Start-up is measured as users have it, with compiled bytecode cached (see bench_cli.py).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

ROOT = Path(__file__).resolve().parents[1]
TARGET_SECONDS = 0.020


def package_copy(folder: Path, completion: bool) -> Path:
    """A copy of the vdeploy package whose Typer app has add_completion=completion."""
    shutil.copytree(ROOT / "vdeploy", folder / "vdeploy", ignore=shutil.ignore_patterns("__pycache__"))
    cli = folder / "vdeploy" / "cli.py"
    text, count = re.subn(r"add_completion=(True|False)", f"add_completion={completion}", cli.read_text())
    if count != 1:
        raise SystemExit(f"{cli}: expected one add_completion= argument, found {count}")
    cli.write_text(text)
    return folder


def timed_help(python_path: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of `python -m vdeploy --help` run from python_path. CPU time (user +
    system) is the steadier figure on a shared machine: waiting for a core does not count."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vdeploy", "--help"], cwd=python_path, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=41)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        without = package_copy(Path(tmp) / "without", completion=False)
        with_completion = package_copy(Path(tmp) / "with", completion=True)
        for folder in (without, with_completion):
            timed_help(folder)  # write the bytecode and warm the page cache
        times: dict[Path, list[tuple[float, float]]] = {without: [], with_completion: []}
        for run in range(args.runs):
            order = (without, with_completion) if run % 2 == 0 else (with_completion, without)
            for folder in order:
                times[folder].append(timed_help(folder))
    for index, what in ((0, "wall"), (1, "CPU")):
        off = statistics.median(t[index] for t in times[without])
        on = statistics.median(t[index] for t in times[with_completion])
        cost = on - off
        verdict = "PASS" if cost < TARGET_SECONDS else "FAIL"
        print(
            f"vdeploy --help {what}: {off * 1000:.1f} ms without completion, {on * 1000:.1f} ms with "
            f"(medians of {args.runs}): completion costs {cost * 1000:+.1f} ms "
            f"(target: < {TARGET_SECONDS * 1000:.0f} ms) {verdict}"
        )


if __name__ == "__main__":
    main()
