"""`vdeploy run`'s own cost and `vdeploy status`'s, beside their targets (issue 10).

Targets:
- from `vdeploy run` to CMD's first instruction: at most `up`'s time to healthy + 0.5 s;
- from CMD's exit to `run`'s exit: at most 10 s on the tiny model;
- `vdeploy status` with 20 run records: at most 3 x `vdeploy --help`.

Run from the repository root, after scripts/setup:
    .venv/bin/python benchmarks/run_overhead.py [--runs 3] [--no-launch]
It copies examples/tiny to a temporary folder and builds the model there (the committed lock is
used). Each launch starts vLLM: `--runs 3` means 3 `up`s and 3 `run`s, taken in turns so a busy
machine slows both alike; --no-launch measures only `status`. CMD is a Python one-liner printing
the clock at its first and last instruction.

vLLM's own start-up varies by tens of seconds between launches on a busy machine, more than the
0.5 s under test, so the verdict compares vdeploy's share of each: for `up`, from the command to
vLLM's process start (its record's pid start time); for `run`, that plus from vLLM's readiness
(the record's `ready`) to CMD's first instruction. The raw medians are printed too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from bench_cli import copy_tiny_example
from up_overhead import median_wall, time_to_healthy

ROOT = Path(__file__).resolve().parents[1]
FIRST_TARGET_SECONDS = 0.5
EXIT_TARGET_SECONDS = 10
STATUS_TARGET_RATIO = 3
RECORDS = 20

CMD = "import time, sys; print(repr(time.time()), flush=True); time.sleep(1); print(repr(time.time()))"


def newest_record(folder: Path) -> dict:
    return json.loads(sorted((folder / ".vdeploy" / "runs").glob("*/record.json"))[-1].read_text())


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def up_once(vdeploy: list[str], folder: Path) -> tuple[float, float]:
    """(`up` → /health answers, vdeploy's share: `up` → vLLM's process start), in seconds."""
    start = time.time()
    healthy = time_to_healthy(vdeploy, folder)
    return healthy, epoch(newest_record(folder)["started"]) - start


def run_once(vdeploy: list[str], folder: Path) -> tuple[float, float, float]:
    """(`run` → CMD's first instruction, vdeploy's share of it, CMD's last instruction → `run`'s exit)."""
    start = time.time()
    done = subprocess.run([*vdeploy, "run", str(folder), "--", sys.executable, "-S", "-c", CMD],
                          capture_output=True, text=True)
    end = time.time()
    if done.returncode != 0:
        logs = sorted((folder / ".vdeploy" / "runs").glob("*/engine.log"))
        tail = logs[-1].read_text(errors="replace")[-3000:] if logs else ""
        raise SystemExit(f"vdeploy run exited {done.returncode}:\n{done.stderr[-3000:]}\nvLLM's log ends:\n{tail}")
    first, last = (float(line) for line in done.stdout.split())
    record = newest_record(folder)
    share = (epoch(record["started"]) - start) + (first - epoch(record["ready"]))
    return first - start, share, end - last


def write_records(folder: Path, count: int) -> None:
    """`count` records shaped as `up` writes them (the whole engine closure, the hardware): a
    quarter never completed, their processes gone, so `status` must check each on the machine."""
    sys.path.insert(0, str(ROOT))
    from vdeploy.engine import installed_engine
    from vdeploy.hardware import read_hardware
    from vdeploy.procfs import boot_id
    from vdeploy.records import RunRecord, new_run_id, now, runs_dir

    engine = installed_engine()
    for index in range(count):
        run_id = new_run_id("%064x" % index)
        complete = index % 4 != 0
        RunRecord(
            folder=runs_dir(folder) / run_id, run_id=run_id, kind="run" if index % 2 else "up",
            deployment="%064x" % index, manifest=str(folder / "vdeploy.toml"),
            argv=[sys.executable, "-m", "vllm.entrypoints.openai.api_server", *["--flag", "value"] * 12],
            env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, inherited={}, pure=False,
            engine={} if engine is None else {"distribution": engine.distribution, "version": engine.version,
                                              "packages": dict(engine.packages)},
            engine_drift=[], url=f"http://127.0.0.1:{20000 + index}", served_model_name="tiny", started=now(),
            hardware=read_hardware(os.environ), boot_id=boot_id(), pid=4_000_000 + index, pid_start=1,
            supervisor_pid=4_100_000 + index, supervisor_start=1,
            stopped=now() if complete else None, exit_code=0 if complete else None,
        ).save()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--no-launch", action="store_true", help="measure only `status` (no vLLM)")
    args = parser.parse_args()

    vdeploy = [sys.executable, "-m", "vdeploy"]
    with tempfile.TemporaryDirectory() as tmp:
        folder = copy_tiny_example(Path(tmp), build=not args.no_launch)
        if not args.no_launch:
            ups, runs = [], []
            for _ in range(args.runs):
                ups.append(up_once(vdeploy, folder))
                runs.append(run_once(vdeploy, folder))
            healthy, up_share = (statistics.median(u[i] for u in ups) for i in (0, 1))
            first, run_share, after = (statistics.median(r[i] for r in runs) for i in (0, 1, 2))
            print(f"raw: up → healthy {healthy:.2f} s; run → CMD's first instruction {first:.2f} s "
                  f"(medians of {args.runs}, vLLM's start-up varies: up {', '.join(f'{u[0]:.1f}' for u in ups)}; "
                  f"run {', '.join(f'{r[0]:.1f}' for r in runs)})")
            verdict = "PASS" if run_share <= up_share + FIRST_TARGET_SECONDS else "FAIL"
            print(f"vdeploy's share before CMD's first instruction: run {run_share:.2f} s vs up {up_share:.2f} s "
                  f"(target: run ≤ up + {FIRST_TARGET_SECONDS} s) {verdict}")
            verdict = "PASS" if after <= EXIT_TARGET_SECONDS else "FAIL"
            print(f"CMD's exit → run's exit: {after:.2f} s (target: ≤ {EXIT_TARGET_SECONDS} s) {verdict}")
        shutil.rmtree(folder / ".vdeploy", ignore_errors=True)
        write_records(folder, RECORDS)
        help_seconds = median_wall([*vdeploy, "--help"], folder, 7)
        status_seconds = median_wall([*vdeploy, "status", str(folder)], folder, 7)
        ratio = status_seconds / help_seconds
        verdict = "PASS" if ratio <= STATUS_TARGET_RATIO else "FAIL"
        print(f"vdeploy --help: {help_seconds:.3f} s; status with {RECORDS} records: {status_seconds:.3f} s = "
              f"{ratio:.1f} x (target: ≤ {STATUS_TARGET_RATIO} x) {verdict}")


if __name__ == "__main__":
    main()
