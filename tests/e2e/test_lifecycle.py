"""The lifecycle of `up` on the real vLLM (CPU build), one test per class of issue 9 (items 5-9)
and the detached deployments of issue 10: a taken port is refused naming its holder, a stop
request during start-up ends `up` at once, vLLM dies with a SIGKILLed `up` and the record then
reads as exited, a launch that fails at Popen completes its record, exit codes say what
happened, and `up --detach` / `status` / `down` run a deployment in the background.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine_support import (
    assert_run_left_nothing,
    free_port,
    group_has,
    lock_and_fetch,
    processes_in_group,
    run_records,
    start_up,
    start_vdeploy,
    tiny_manifest,
    wait_until,
)

from vdeploy.processes import STOP_GRACE_SECONDS
from vdeploy.status import answers_health

READY = 300


@pytest.fixture(scope="module")
def locked(make_project, tiny_repo):
    project = make_project("lifecycle")
    project.write_manifest(tiny_manifest(tiny_repo))
    lock_and_fetch(project)
    return project


def one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- 5: the port -----------------------------------------------------------------------------


@pytest.fixture
def other_server(tmp_path):
    """Someone else's HTTP server on a port, answering /health with 200."""
    (tmp_path / "health").write_text("ok\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = int(server.stdout.readline().split(" port ")[1].split()[0])
    yield server, port
    server.kill()
    server.wait()


def test_a_port_held_by_another_server_is_refused_before_vllm_starts(locked, other_server):
    server, port = other_server
    assert answers_health(f"http://127.0.0.1:{port}")  # what `up` used to take for its own vLLM
    before = len(run_records(locked))
    for command in (["up", "--no-fetch", "--port", str(port)], ["run", "--no-fetch", "--port", str(port), "--", "true"]):
        _, _, stderr = locked.run_vdeploy(*command, expect=1, timeout=180)
        line = one_error(stderr)
        assert f"port {port} is taken by pid {server.pid} (" in line and "http.server" in line, line
    assert len(run_records(locked)) == before  # refused before anything started


# ---- 6 and 9: stop requests during start-up --------------------------------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_request_during_start_up_ends_up_within_the_grace_period(locked, sig, code):
    started = start_vdeploy(locked, "up", "--no-fetch", "--port", str(free_port()), name=f"startup-{sig.name}")
    before = len(run_records(locked))
    record = wait_until(lambda: len(run_records(locked)) > before and run_records(locked)[-1].get("pid") and run_records(locked)[-1],
                        60, "the run record names vLLM's pid")
    # mid start-up: the engine core runs, /health does not answer yet
    wait_until(lambda: group_has(record["pid"], "EngineCore") or started.process.poll() is not None, READY, "EngineCore started")
    assert run_records(locked)[-1]["ready"] is None, "vLLM got ready before the test could stop it mid start-up"
    begin = time.monotonic()
    started.process.send_signal(sig)
    assert started.wait(STOP_GRACE_SECONDS + 30) == code, started.err()[-3000:]
    took = time.monotonic() - begin
    record = run_records(locked)[-1]
    assert (record["exit_code"], record["stopped_by"], record["ready"]) == (code, sig.name, None)
    assert record["reason"] == "stopped before vLLM was ready" and record["stopped"]
    assert took < STOP_GRACE_SECONDS + 10, f"`up` took {took:.1f} s to stop"
    assert_run_left_nothing(locked, record)


# ---- 7: SIGKILL of up ------------------------------------------------------------------------


def test_vllm_dies_with_a_sigkilled_up_and_its_record_reads_as_exited(locked):
    running = start_up(locked, "--no-fetch")
    record = run_records(locked)[-1]
    assert group_has(record["pid"], "EngineCore")
    running.process.send_signal(signal.SIGKILL)
    running.process.wait()
    begin = time.monotonic()
    wait_until(lambda: not processes_in_group(record["pid"]), STOP_GRACE_SECONDS + 10, "vLLM's group gone")
    took = time.monotonic() - begin
    assert took < STOP_GRACE_SECONDS + 5, f"vLLM took {took:.1f} s to follow its supervisor"
    assert not answers_health(running.url, timeout=1)
    assert_run_left_nothing(locked, record)

    _, listing, _ = locked.run_vdeploy("runs")
    line = next(l for l in listing.splitlines() if record["run_id"] in l)
    assert "exited ?" in line and "running" not in listing
    assert json.loads(locked.run_vdeploy("runs", "--json")[1])[-1]["state"] == "exited"
    _, status, _ = locked.run_vdeploy("status")
    assert record["run_id"] in status and " exited " in status
    _, _, stderr = locked.run_vdeploy("down", record["run_id"])
    assert f"stopped {record['run_id']}" in stderr
    assert json.loads(locked.run_vdeploy("status", "--json")[1]) == []


# ---- 8: a launch that fails at Popen ---------------------------------------------------------


def exec_size(argv: list[str], env: dict[str, str]) -> int:
    """What execve counts against the argument limit: the strings, their NULs, one pointer each."""
    strings = [argv[0], *argv, *(f"{k}={v}" for k, v in env.items())]
    return sum(len(s.encode()) + 1 for s in strings) + 8 * (len(argv) + len(env))


def test_a_launch_that_fails_at_popen_completes_its_record(make_project, tiny_repo):
    """vLLM's exec is refused with E2BIG: the caller's environment is near the limit, and the
    engine's adds a 100 KiB key (read from a file at launch). `vdeploy up` itself starts fine."""
    project = make_project("popen-fails")
    project.write_manifest(tiny_manifest(tiny_repo, serve='api-key = { file = "key.txt" }\n'))
    (project.folder / "key.txt").write_text("k" * (100 << 10))
    lock_and_fetch(project)
    limit = 8 << 20  # RLIMIT_STACK for the test; execve allows a quarter of it for arguments
    argv = [sys.executable, "-m", "vdeploy", "up", "--no-fetch", "--port", str(free_port())]
    env = project.env()
    room = limit // 4 - exec_size(argv, env) - (50 << 10)  # leave 50 KiB: less than the key needs
    index = 0
    while room > 64:
        chunk = min(room - 16, 120 << 10)
        env[f"PADDING_{index}"] = "p" * chunk
        room -= chunk + len(f"PADDING_{index}=") + 1 + 8
        index += 1
    done = subprocess.run(argv, cwd=project.folder, env=env, capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_STACK, (limit, limit)))
    assert done.returncode == 1, done.stderr[-3000:]
    line = one_error(done.stderr)
    assert "cannot start vLLM" in line and "Argument list too long" in line and "record.json" in line
    record = run_records(project)[-1]
    assert record["exit_code"] == 1 and record["stopped"] and record["pid"] is None
    assert "Argument list too long" in record["reason"]
    _, listing, _ = project.run_vdeploy("runs")
    assert "exit 1" in listing and "running" not in listing
    assert not (project.cache / "live" / record["run_id"]).exists()


# ---- 9: vLLM's own exit code -----------------------------------------------------------------


def test_vllm_s_own_exit_code_is_up_s_when_it_ends_by_itself(make_project, tiny_repo):
    """A max-model-len beyond the model's 256 positions: vLLM refuses it at start and exits."""
    project = make_project("own-exit")
    project.write_manifest(tiny_manifest(tiny_repo).replace("max-model-len = 256", "max-model-len = 512"))
    lock_and_fetch(project)
    code, _, stderr = project.run_vdeploy("up", "--no-fetch", "--port", str(free_port()), expect=None, timeout=READY)
    record = run_records(project)[-1]
    assert code != 0 and code == record["exit_code"] == record["engine_exit_code"], stderr[-3000:]
    assert record["stopped_by"] == "engine" and record["reason"] == f"vLLM exited with code {code} before it was ready"
    assert f"vLLM exited with code {code} before it was ready; its log: " in stderr
    assert "max_model_len" in Path(record["manifest"]).parent.joinpath(".vdeploy", "runs", record["run_id"], "engine.log").read_text()
    assert_run_left_nothing(project, record)


# ---- detached: up --detach, status, down -----------------------------------------------------


def test_a_detached_deployment_runs_on_until_down(locked, tmp_path):
    port = free_port()
    begin = time.monotonic()
    code, _, stderr = locked.run_vdeploy("up", "--no-fetch", "--detach", "--port", str(port), expect=None, timeout=READY + 60)
    assert code == 0, stderr[-3000:]
    record = run_records(locked)[-1]
    url = f"http://127.0.0.1:{port}"
    assert answers_health(url), "up --detach returned before /health answered"
    assert f"ready: {url}/v1" in stderr and f"run {record['run_id']}" in stderr
    assert record["detached"] and record["ready"] and not record["stopped"]
    try:
        # status, here and machine-wide (from elsewhere)
        rows = json.loads(locked.run_vdeploy("status", "--json")[1])
        assert [(r["run_id"], r["state"], r["healthy"], r["url"]) for r in rows] == [(record["run_id"], "running", True, url)]
        assert rows[0]["deployment"] == record["deployment"] and 0 < rows[0]["uptime_seconds"] < time.monotonic() - begin + 5
        everywhere = json.loads(locked.run_vdeploy("status", "--all", "--json", cwd=tmp_path)[1])
        assert record["run_id"] in [r["run_id"] for r in everywhere]
        # a second `up` on the taken port is refused before vLLM starts, naming the run
        before = len(run_records(locked))
        line = one_error(locked.run_vdeploy("up", "--no-fetch", "--port", str(port), expect=1, timeout=180)[2])
        assert f"port {port} is taken by vdeploy up {record['run_id']}" in line
        assert len(run_records(locked)) == before
    finally:
        _, _, stderr = locked.run_vdeploy("down", timeout=STOP_GRACE_SECONDS + 30)
    assert f"stopped {record['run_id']} (exit 143" in stderr
    done = run_records(locked)[-1]
    assert (done["run_id"], done["stopped_by"], done["exit_code"]) == (record["run_id"], "down", 143)
    assert not answers_health(url, timeout=1)
    assert_run_left_nothing(locked, done)
    assert json.loads(locked.run_vdeploy("status", "--json")[1]) == []
    assert (Path(record["manifest"]).parent / ".vdeploy" / "runs" / record["run_id"] / "supervisor.log").exists()
