"""`vdeploy run -- CMD` on the real vLLM (CPU build), with the official `openai` client as CMD
(issue 10): answers arrive through OPENAI_BASE_URL alone, the record names the deployment, CMD's
exit code passes through, nothing is left running, Ctrl-C stops a CMD that never ends, and a vLLM
that dies first takes CMD down with it. Each `run` starts its own vLLM, so each test is a launch.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import select
import signal
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from engine_support import assert_run_left_nothing, lock_and_fetch, run_records, start_vdeploy, tiny_manifest, wait_until

from vdeploy.lockfile import loads_lock

READY = 300
KEY_VARIABLE = "RUN_TEST_SERVING_AUTH"
KEY = "sk-run-" + secrets.token_hex(12)

# The experiment: the official client, configured by nothing but the environment.
CLIENT = """\
import json, os, sys
from openai import OpenAI

client = OpenAI()
model = os.environ["VDEPLOY_MODEL"]
completion = client.completions.create(model=model, prompt="Hello", max_tokens=6, temperature=0)
chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0)
print(json.dumps({
    "models": [m.id for m in client.models.list()],
    "fingerprint": completion.system_fingerprint,
    "completion_tokens": completion.usage.completion_tokens,
    "chat_tokens": chat.usage.completion_tokens,
    "env": {k: os.environ.get(k) for k in ("OPENAI_BASE_URL", "VDEPLOY_DEPLOYMENT", "VDEPLOY_MODEL", "VDEPLOY_RUN", "CALLER_MARK")},
    "key_is_empty": os.environ["OPENAI_API_KEY"] == "EMPTY",
}), flush=True)
print("client done", file=sys.stderr, flush=True)
sys.exit(int(sys.argv[1]))
"""

FOREVER = "import time; print('waiting', flush=True); time.sleep(3600)"

# Reads a line from the terminal, then waits for Ctrl-C.
ASKS = "import time; print('name?', flush=True); print('hello ' + input(), flush=True); time.sleep(3600)"

# Kills vLLM's whole group (as the OOM killer would), then waits forever.
KILL_ENGINE = """\
import json, os, signal, time
record = json.load(open(os.path.join(os.environ["VDEPLOY_RUN"], "record.json")))
os.killpg(record["pid"], signal.SIGKILL)
print("killed", flush=True)
time.sleep(3600)
"""


@pytest.fixture(scope="module")
def locked(make_project, tiny_repo):
    """The tiny model, locked and fetched, with the client beside it; no port in the manifest."""
    project = make_project("run")
    project.write_manifest(tiny_manifest(tiny_repo))
    lock_and_fetch(project)
    (project.folder / "client.py").write_text(CLIENT)
    return project


def run(project, *command: str, env: dict[str, str] | None = None, name: str = "run"):
    return start_vdeploy(project, "run", "--no-fetch", "--", *command, env=env, name=name)


def test_the_openai_client_gets_answers_and_its_exit_code_is_run_s(locked):
    lock = loads_lock(locked.lock.read_text())
    started = run(locked, sys.executable, "client.py", "0", env={"CALLER_MARK": "from-the-caller"})
    assert started.wait(READY + 60) == 0, started.err()[-3000:]
    answer = json.loads(started.out())  # CMD's stdout is run's stdout, and nothing else is
    assert answer["models"] == ["tiny"] and answer["fingerprint"] == lock.deployment
    assert answer["completion_tokens"] > 0 and answer["chat_tokens"] > 0
    record = run_records(locked)[-1]
    env = answer["env"]
    assert env["OPENAI_BASE_URL"] == record["url"] + "/v1" and env["OPENAI_BASE_URL"].startswith("http://127.0.0.1:")
    assert env["VDEPLOY_DEPLOYMENT"] == lock.deployment and env["VDEPLOY_MODEL"] == "tiny"
    assert Path(env["VDEPLOY_RUN"]) == locked.folder / ".vdeploy" / "runs" / record["run_id"]
    assert env["CALLER_MARK"] == "from-the-caller" and answer["key_is_empty"]
    assert "ready: " in started.err() and "client done" in started.err()

    assert (record["kind"], record["deployment"], record["exit_code"], record["stopped_by"]) == ("run", lock.deployment, 0, "command")
    assert record["command"]["argv"] == [sys.executable, "client.py", "0"]
    assert record["command"]["cwd"] == str(locked.folder) and record["command"]["exit_code"] == 0
    assert record["ready"] < record["command"]["started"] <= record["command"]["stopped"] <= record["stopped"]
    assert record["hardware"]["class"].startswith("hw-") and record["effective"]["dtype"] == "torch.float32"
    folder = Path(env["VDEPLOY_RUN"])
    assert "client done" in (folder / "command.log").read_text() and "client done" not in (folder / "engine.log").read_text()
    assert "Starting vLLM" in (folder / "engine.log").read_text() and "Starting vLLM" not in started.out() + started.err()
    assert (folder / "vdeploy.lock").read_bytes() == locked.lock.read_bytes()  # the lock that ran, kept
    assert_run_left_nothing(locked, record)
    listing = json.loads(locked.run_vdeploy("runs", "--json")[1])
    assert listing[-1]["state"] == "exited" and listing[-1]["command_log"] == str(folder / "command.log")


def test_a_failing_command_s_code_passes_through_and_the_key_reaches_it(make_project, tiny_repo):
    """With [serve] api-key, the client authenticates with OPENAI_API_KEY alone."""
    project = make_project("run-key")
    project.write_manifest(tiny_manifest(tiny_repo, serve=f'api-key = {{ env = "{KEY_VARIABLE}" }}\n'))
    lock_and_fetch(project)
    (project.folder / "client.py").write_text(CLIENT)
    started = run(project, sys.executable, "client.py", "7", env={KEY_VARIABLE: KEY})
    assert started.wait(READY + 60) == 7, started.err()[-3000:]
    answer = json.loads(started.out())
    assert answer["models"] == ["tiny"] and not answer["key_is_empty"]  # the server refuses other keys
    record = run_records(project)[-1]
    assert (record["exit_code"], record["command"]["exit_code"], record["stopped_by"]) == (7, 7, "command")
    assert "the command exited with code 7" in started.err()
    folder = project.folder / ".vdeploy" / "runs" / record["run_id"]
    for kept in (folder / "record.json", folder / "command.log", folder / "engine.log"):
        assert KEY not in kept.read_text()
    assert_run_left_nothing(project, record)


def test_ctrl_c_stops_a_command_that_never_ends_and_the_engine(locked):
    started = run(locked, sys.executable, "-c", FOREVER, name="forever")
    wait_until(lambda: "waiting" in started.out() or started.process.poll() is not None, READY, "CMD started")
    record = run_records(locked)[-1]
    begin = time.monotonic()
    started.process.send_signal(signal.SIGINT)
    assert started.wait(60) == 130, started.err()[-3000:]
    took = time.monotonic() - begin
    record = run_records(locked)[-1]
    assert (record["exit_code"], record["stopped_by"]) == (130, "SIGINT")
    assert record["command"]["exit_code"] == 143  # CMD was stopped with SIGTERM
    assert took < 25, f"run took {took:.1f} s to stop"
    assert_run_left_nothing(locked, record)


def test_a_dying_engine_stops_the_command_and_run_says_so(locked):
    started = run(locked, sys.executable, "-c", KILL_ENGINE, name="kill-engine")
    assert started.wait(READY + 60) == 137, started.err()[-3000:]
    record = run_records(locked)[-1]
    assert (record["exit_code"], record["engine_exit_code"], record["stopped_by"]) == (137, 137, "engine")
    assert record["command"]["exit_code"] == 143
    lines = [line for line in started.err().splitlines() if "vLLM exited" in line]
    assert lines == [f"vLLM exited with code 137 while the command ran; the command was stopped; "
                     f"vLLM's log: {locked.folder / '.vdeploy' / 'runs' / record['run_id'] / 'engine.log'}"]
    assert_run_left_nothing(locked, record)


def read_until(fd: int, text: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while text not in seen and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal's other side closed
                break
            seen += chunk
    assert text in seen, seen[-2000:]
    return seen


def test_on_a_terminal_the_command_gets_the_terminal_for_reads_and_ctrl_c(locked):
    """As under a shell: CMD reads the terminal (not stopped by SIGTTIN) and Ctrl-C reaches it."""
    master, slave = os.openpty()

    def controlling_terminal() -> None:  # vdeploy runs as a shell's foreground job on this terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen(
        [sys.executable, "-m", "vdeploy", "run", "--no-fetch", "--", sys.executable, "-c", ASKS],
        cwd=locked.folder, env=locked.env(), stdin=slave, stdout=slave, stderr=slave,
        start_new_session=True, preexec_fn=controlling_terminal,
    )
    os.close(slave)
    try:
        read_until(master, b"name?", READY)
        os.write(master, b"vdeploy\n")
        read_until(master, b"hello vdeploy", 30)
        os.write(master, b"\x03")  # Ctrl-C, typed on the terminal
        assert process.wait(timeout=60) == 130
    finally:
        if process.poll() is None:
            process.kill()
        os.close(master)
    record = run_records(locked)[-1]
    assert (record["exit_code"], record["stopped_by"], record["command"]["exit_code"]) == (130, "command", 130)
    assert_run_left_nothing(locked, record)
