"""`vdeploy check`'s own overhead beyond the server's answer time, on 20 checks (issue 12).

Target: `vdeploy check --url URL` takes at most 5% longer than the same 20 requests sent raw, one
after another, over urllib (the server's answer time). Two figures are printed beside it: the whole
command in a fresh process (Python start-up, imports from compiled bytecode as installed, manifest,
lock, plan, the golden file, the requests, the comparison, the report), and check's own work in a warm process (`vdeploy.check.check`
called in-process: everything but Python's start-up and imports, which cost the same whatever the
number of checks and however slow the model).

Run from the repository root, after scripts/setup:
    .venv/bin/python benchmarks/check_overhead.py [--runs 5]
It copies examples/tiny to a temporary folder, builds the model there (the committed lock is used:
checks need no relock), adds 20 [[check]]s, starts one `vdeploy up --detach`, records the golden
answers once, then times raw and `check` in turns (so a busy machine slows both alike) and prints
the medians. One launch of vLLM in all; `vdeploy down` stops it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench_cli import copy_tiny_example

TARGET_PERCENT = 5
CHECKS = 20
PROMPTS = ["Hello", "The capital of", "1 2 3", "Once upon a time", "def main():"]


def check_tables() -> str:
    tables = []
    for index in range(CHECKS):
        temperature = "\ntemperature = 1.0" if index % 2 else ""
        tables.append(f'\n[[check]]\nname = "c{index:02d}"\nprompt = "{PROMPTS[index % len(PROMPTS)]} {index}"'
                      f"\nmax-tokens = 16{temperature}\n")
    return "".join(tables)


def raw_seconds(url: str, bodies: list[tuple[str, dict]]) -> float:
    """The server's answer time: the same requests, sent one after another, answers read and parsed."""
    start = time.perf_counter()
    for endpoint, body in bodies:
        request = urllib.request.Request(url + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as answer:
            json.loads(answer.read())
    return time.perf_counter() - start


def installed_env(pycache: Path) -> dict[str, str]:
    """This environment, with compiled bytecode kept (in `pycache`) as an installed vdeploy has it:
    where PYTHONDONTWRITEBYTECODE is set, every start would compile vdeploy's sources again."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def check_seconds(vdeploy: list[str], folder: Path, url: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([*vdeploy, "check", "--url", url, str(folder)], capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"vdeploy check exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return elapsed


def in_process_seconds(folder: Path, url: str) -> float:
    from vdeploy.check import CheckOptions, check

    start = time.perf_counter()
    report = check(folder, CheckOptions(url=url), lambda line: None)
    elapsed = time.perf_counter() - start
    if not report.ok:
        raise SystemExit("\n".join(report.render()))
    return elapsed


def overhead_line(label: str, seconds: list[float], raws: list[float]) -> str:
    """The median time, and the median of each round's overhead over that round's raw requests."""
    overhead = statistics.median(100 * (s - r) / r for s, r in zip(seconds, raws))
    extra = statistics.median(s - r for s, r in zip(seconds, raws))
    verdict = "ok" if overhead <= TARGET_PERCENT else "OVER TARGET"
    runs = ", ".join(f"{s:.2f}" for s in seconds)
    return (f"  {label:<40} {statistics.median(seconds):.2f} s   (runs: {runs})\n"
            f"    overhead {overhead:.1f}% ({extra:.2f} s)   target <= {TARGET_PERCENT}%   {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    vdeploy = [sys.executable, "-m", "vdeploy"]
    with tempfile.TemporaryDirectory(prefix="vdeploy-check-bench-") as base:
        folder = copy_tiny_example(Path(base))
        with open(folder / "vdeploy.toml", "a") as manifest:
            manifest.write(check_tables())
        from vdeploy.check import request_body
        from vdeploy.manifest import load_manifest

        loaded = load_manifest(folder)
        bodies = [(spec.endpoint, {"model": "tiny", **request_body(spec, loaded.seed)}) for spec in loaded.checks]
        from vdeploy.launch import free_loopback_port

        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        subprocess.run([*vdeploy, "up", "--detach", "--port", str(port), str(folder)], check=True)
        try:
            subprocess.run([*vdeploy, "check", "--record", "--url", url, str(folder)], check=True, capture_output=True)
            raw_seconds(url, bodies)  # warm: the first answers of a fresh server are slower
            raws, checks, warm = [], [], []
            env = installed_env(Path(base) / "pycache")
            check_seconds(vdeploy, folder, url, env)  # compiles the bytecode, once
            in_process_seconds(folder, url)  # imports, once
            for run in range(args.runs):
                # One round each, in turns, alternating the order: a machine busy for a while slows
                # all three of a round alike, and the overhead is taken round by round.
                measures = [lambda: raws.append(raw_seconds(url, bodies)),
                            lambda: checks.append(check_seconds(vdeploy, folder, url, env)),
                            lambda: warm.append(in_process_seconds(folder, url))]
                for measure in measures if run % 2 == 0 else reversed(measures):
                    measure()
        finally:
            subprocess.run([*vdeploy, "down", str(folder)], capture_output=True)
    raw = statistics.median(raws)
    print(f"{CHECKS} checks, median of {args.runs} runs on {os.cpu_count()} cores:")
    print(f"  {'raw requests (the server answer time):':<40} {raw:.2f} s   (runs: {', '.join(f'{r:.2f}' for r in raws)})")
    print(overhead_line("vdeploy check --url (a fresh process):", checks, raws))
    print(overhead_line("check's own work (warm, in-process):", warm, raws))


if __name__ == "__main__":
    main()
