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
