"""The supervisor's parts on real processes, sockets and HTTP servers (issue 9, items 5-7).

The thing under test is vdeploy's supervision (process groups, the parent-death signal, the
watchdog, the port check, the health probe), so these tests drive it against small real
programs that behave the way vLLM's processes do where it matters: a group leader that dies on
SIGTERM and a child in its group that does not watch its parent (vLLM's EngineCore), or one
that ignores SIGTERM. They run in seconds; tests/e2e/test_lifecycle.py checks the same paths
with the real engine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vdeploy import procfs
from vdeploy.errors import LaunchError
from vdeploy.launch import RUN_PORT_FLOOR, check_port_free, free_loopback_port
from vdeploy.processes import exit_status, stop_groups
from vdeploy.plan import Plan
from vdeploy.records import RunRecord, now, register_live
from vdeploy.status import answers_health

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

ROOT = Path(__file__).resolve().parents[1]

# A process group shaped like vLLM's: the leader starts a child in its group that never looks at
# its parent, then waits. IGNORE_TERM=1 makes the child ignore SIGTERM.
LEADER = """
import os, signal, subprocess, sys, time
child = "import signal, time\\nif {ignore}: signal.signal(signal.SIGTERM, signal.SIG_IGN)\\nprint('child up', flush=True)\\ntime.sleep(600)"
subprocess.Popen([sys.executable, "-c", child.format(ignore=os.environ.get("IGNORE_TERM") == "1")])
time.sleep(600)
"""

# A supervisor: starts the group the way launch does (own session, parent-death signal, watchdog),
# prints the group id, then waits to be killed (or releases the watchdog when told to).
SUPERVISOR = """
import signal, subprocess, sys, time
from vdeploy.processes import Watchdog, die_with_parent
leader = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True,
                          preexec_fn=die_with_parent(signal.SIGTERM))
watchdog = Watchdog.start(leader.pid, grace=float(sys.argv[2]))
print(leader.pid, flush=True)
if sys.argv[3] == "release":
    watchdog.release()
time.sleep(600)
"""


def start_supervisor(grace: float, mode: str = "watch", ignore_term: bool = False) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "IGNORE_TERM": "1" if ignore_term else "0"}
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, LEADER, str(grace), mode],
                                  env=env, stdout=subprocess.PIPE, text=True)
    pgid = int(supervisor.stdout.readline())
    assert supervisor.stdout.readline() == "child up\n"  # the group's child runs, its handler set
    assert len(procfs.group_members(pgid)) == 2
    return supervisor, pgid


def wait_gone(pgid: int, seconds: float) -> float:
    start = time.monotonic()
    while procfs.group_members(pgid) and time.monotonic() - start < seconds:
        time.sleep(0.05)
    return time.monotonic() - start


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_the_whole_group_dies_with_a_sigkilled_supervisor():
    supervisor, pgid = start_supervisor(grace=5)
    try:
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        took = wait_gone(pgid, 10)
        assert procfs.group_members(pgid) == [], "the group outlived its supervisor"
        assert took < 3, f"the group took {took:.1f} s to go"  # SIGTERM suffices here: no grace waited
    finally:
        kill_group(pgid)


def test_a_member_ignoring_sigterm_is_killed_after_the_grace_period():
    supervisor, pgid = start_supervisor(grace=1, ignore_term=True)
    try:
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        took = wait_gone(pgid, 10)
        assert procfs.group_members(pgid) == []
        assert 0.8 < took < 4, f"took {took:.1f} s"
    finally:
        kill_group(pgid)


def test_a_released_watchdog_leaves_the_group_alone():
    supervisor, pgid = start_supervisor(grace=1, mode="release")
    try:
        time.sleep(0.5)
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait()
        time.sleep(2)
        # the leader got its parent-death signal; the child, which does not watch, is still there
        assert len(procfs.group_members(pgid)) == 1
    finally:
        kill_group(pgid)


def test_stop_groups_terms_then_kills_and_a_second_request_hurries_it():
    for ignore, hurry, low, high in ((False, False, 0, 2), (True, False, 1.5, 5), (True, True, 0, 1.5)):
        env = {**os.environ, "IGNORE_TERM": "1" if ignore else "0"}
        leader = subprocess.Popen([sys.executable, "-c", LEADER], env=env, start_new_session=True,
                                  stdout=subprocess.PIPE, text=True)
        assert leader.stdout.readline() == "child up\n"
        start = time.monotonic()
        stop_groups([(leader.pid, leader)], grace=2, hurry=lambda: hurry)
        took = time.monotonic() - start
        assert procfs.group_members(leader.pid) == [] and leader.returncode is not None
        assert low <= took < high, (ignore, hurry, took)


def test_exit_status_is_what_a_shell_shows():
    assert [exit_status(c) for c in (0, 3, -2, -15, -9)] == [0, 3, 130, 143, 137]


@pytest.fixture
def other_server(tmp_path):
    """Another program's HTTP server that answers /health, in its own process."""
    (tmp_path / "health").write_text("ok\n")
    server = subprocess.Popen([sys.executable, "-m", "http.server", "0", "--bind", "127.0.0.1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = server.stdout.readline()  # "Serving HTTP on 127.0.0.1 port N (http://127.0.0.1:N/) ..."
    port = int(line.split(" port ")[1].split()[0])
    yield server, port
    server.kill()
    server.wait()


def plan_on(port: int, host: str | None = None) -> Plan:
    return Plan(argv=(), env={}, secrets={}, inherited={}, deployment="0" * 64, engine=None,
                served_model_name="m", host=host, port=port)


def test_a_port_held_by_another_server_is_refused_naming_its_process(other_server, tmp_path):
    server, port = other_server
    assert answers_health(f"http://127.0.0.1:{port}")  # it would have passed for a ready vLLM
    with pytest.raises(LaunchError) as refused:
        check_port_free(plan_on(port), tmp_path)
    message = str(refused.value)
    assert f"port {port} is taken by pid {server.pid} (" in message and "http.server" in message
    server.kill()
    server.wait()
    check_port_free(plan_on(port), tmp_path)
    assert not answers_health(f"http://127.0.0.1:{port}", timeout=0.5)


def test_a_port_held_by_a_live_run_of_any_project_is_refused_naming_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    me = procfs.identity(os.getpid())
    other_project = tmp_path / "other" / ".vdeploy" / "runs" / "20260101T000000000000Z-abc"
    record = RunRecord(
        folder=other_project, run_id=other_project.name, kind="up", deployment="a" * 64,
        manifest=str(tmp_path / "other" / "vdeploy.toml"), argv=[], env={}, inherited={}, pure=False,
        engine={}, engine_drift=[], url="http://127.0.0.1:18555", served_model_name="m", started=now(),
        supervisor_pid=me.pid, supervisor_start=me.start, boot_id=procfs.boot_id(),
    )
    record.save()
    register_live(record)
    with pytest.raises(LaunchError, match=f"port 18555 is taken by vdeploy up {record.run_id} of .*other/vdeploy.toml"):
        check_port_free(plan_on(18555), tmp_path / "this")
    check_port_free(plan_on(18556), tmp_path / "this")


def test_run_s_own_port_is_free_and_below_the_ephemeral_range():
    """Outgoing connections take ports from the ephemeral range: a port above its floor that
    bind(0) hands out can be taken by one before vLLM binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = {free_loopback_port() for _ in range(5)}
    for port in ports:
        assert RUN_PORT_FLOOR <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))
    assert len(ports) > 1  # chosen at random, so two runs starting together do not race for one
