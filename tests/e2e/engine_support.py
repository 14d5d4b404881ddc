"""Helpers for the end-to-end tests: start `vdeploy up`, call the server, look for leftover processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

READY_TIMEOUT = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_manifest(repo: str, seed: int = 0, serve: str = "", extra: str = "") -> str:
    return f"""[model]
repo = "{repo}"

[serve]
served-model-name = "tiny"
dtype = "float32"
max-model-len = 256
max-num-seqs = 4
enforce-eager = true
{serve}
[runtime]
seed = {seed}
env = {{ VLLM_CPU_KVCACHE_SPACE = "1" }}
{extra}"""


@dataclass
class Running:
    """A `vdeploy up` process (and, below it, vLLM), with its log."""

    process: subprocess.Popen
    log: Path
    url: str

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)


def start_up(project, *args: str, env: dict[str, str] | None = None, scheme: str = "http") -> Running:
    """Start `vdeploy up` on a free port and wait until it says the server is ready."""
    port = free_port()
    log = project.folder / f"up-{port}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "vdeploy", "up", "--port", str(port), *args],
        cwd=project.folder,
        env=project.env(env),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    running = Running(process=process, log=log, url=f"{scheme}://127.0.0.1:{port}")
    deadline = time.monotonic() + READY_TIMEOUT
    while "ready: " not in running.output():
        if process.poll() is not None:
            raise AssertionError(f"vdeploy up exited with {process.returncode}:\n{running.output()[-4000:]}")
        if time.monotonic() > deadline:
            running.stop(signal.SIGKILL)
            raise AssertionError(f"vdeploy up not ready in {READY_TIMEOUT} s:\n{running.output()[-4000:]}")
        time.sleep(0.5)
    return running


def call(url: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None,
         context=None) -> tuple[int, dict, dict]:
    """One HTTP call; returns (status, JSON body, headers)."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120, context=context) as answer:
            return answer.status, json.loads(answer.read() or b"{}"), dict(answer.headers)
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            payload = json.loads(text)
        except ValueError:
            payload = {"raw": text.decode(errors="replace")}
        return error.code, payload, dict(error.headers)


PROMPTS = ["Hello", "The capital of", "1 2 3"]


def complete_three(url: str, deployment: str) -> list[tuple[str, list[float]]]:
    """Three completions at temperature 1.0 with logprobs; each response must carry the deployment id.
    A fresh launch of one lock (seed 0) gives the same answers every time."""
    answers = []
    for prompt in PROMPTS:
        status, body, _ = call(url, "/v1/completions", {
            "model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 1.0, "logprobs": 1,
        })
        assert status == 200, body
        assert body["system_fingerprint"] == deployment
        choice = body["choices"][0]
        answers.append((choice["text"], choice["logprobs"]["token_logprobs"]))
    return answers


def processes_in_group(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # fields[0] is the state, [2] the process group; zombies are already gone for our purpose
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


def processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry) != os.getpid():
            found.append(int(entry))
    return found


@dataclass
class Background:
    """A vdeploy command running in the background, its stdout and stderr in files."""

    process: subprocess.Popen
    stdout: Path
    stderr: Path

    def out(self) -> str:
        return self.stdout.read_text(errors="replace")

    def err(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"still running after {timeout} s:\n{self.err()[-3000:]}") from None


def start_vdeploy(project, *args: str, env: dict[str, str] | None = None, name: str = "cmd") -> Background:
    """Start `python -m vdeploy ARGS` in the project folder, stdin closed, output to files."""
    stdout, stderr = project.folder / f"{name}.out", project.folder / f"{name}.err"
    process = subprocess.Popen(
        [sys.executable, "-m", "vdeploy", *args], cwd=project.folder, env=project.env(env),
        stdin=subprocess.DEVNULL, stdout=stdout.open("w"), stderr=stderr.open("w"),
    )
    return Background(process, stdout, stderr)


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    """condition()'s first truthy value, or an AssertionError naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


def run_records(project) -> list[dict]:
    """Every run record of the project, oldest first."""
    return [json.loads(p.read_text()) for p in sorted((project.folder / ".vdeploy" / "runs").glob("*/record.json"))]


def group_has(pgid: int, text: str) -> bool:
    """A live process of the group has `text` in its command line (vLLM's "VLLM::EngineCore")."""
    for pid in processes_in_group(pgid):
        try:
            if text in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return True
        except OSError:
            continue
    return False


def assert_run_left_nothing(project, record: dict) -> None:
    """No process of the run's engine group or CMD's group lives, and none runs from the store."""
    if record.get("pid"):
        assert processes_in_group(record["pid"]) == [], "vLLM processes outlived vdeploy"
    if (record.get("command") or {}).get("pid"):
        assert processes_in_group(record["command"]["pid"]) == [], "CMD's processes outlived `vdeploy run`"
    assert processes_mentioning(str(project.store)) == [], "a process still runs from the store"


def lock_and_fetch(project, timeout: float = 600) -> None:
    """`vdeploy lock` then `fetch`; lock's first engine probe imports vLLM, slow on a busy machine."""
    project.run_vdeploy("lock", timeout=timeout)
    project.run_vdeploy("fetch", timeout=timeout)
