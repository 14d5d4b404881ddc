"""Processes and listening sockets as /proc shows them: parsers on kernel text, readers on real
sockets and processes of this test (issue 9: who holds a port, whose answer counts as ready)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vdeploy import procfs
from vdeploy.launch import group_listens_on

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 123456 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A3F2 0100007F:1F40 01 00000000:00000000 02:000A3B91 00000000  1000        0 123999 2 0000000000000000 20 4 30 10 -1
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17654 1 0000000000000000 100 0 0 10 0
"""
TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 55555 1 0000000000000000 100 0 0 10 0
"""


def test_tcp_tables_are_parsed_for_port_state_and_inode():
    sockets = procfs.parse_tcp_table(TCP)
    assert [(s.port, s.state, s.inode) for s in sockets] == [(8000, "0A", 123456), (41970, "01", 123999), (22, "0A", 17654)]
    assert [(s.port, s.inode) for s in procfs.parse_tcp_table(TCP6)] == [(8080, 55555)]
    assert procfs.parse_tcp_table("header only\n") == []


def test_stat_is_read_past_a_command_name_with_spaces_and_parentheses():
    text = "4242 (vllm (x) y) S 1 4240 4240 0 -1 4194560 10 0 0 0 5 3 0 0 20 0 7 0 987654 1000 50 0 0"
    assert procfs.parse_stat(text) == ("S", 4240, 987654)
    assert procfs.parse_stat("garbage") is None


def listening(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    sock.listen()
    return sock


def test_the_process_holding_a_listening_port_is_found_and_named():
    with listening() as sock:
        port = sock.getsockname()[1]
        assert procfs.listening_inodes(port)
        assert os.getpid() in procfs.holders(procfs.listening_inodes(port))
        named = procfs.describe_holders(port)
        assert f"pid {os.getpid()} (" in named and "python" in named
    assert procfs.listening_inodes(port) == set() and procfs.describe_holders(port) is None


def test_ipv6_listeners_are_found_too():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        sock = listening(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with sock:
        assert os.getpid() in procfs.holders(procfs.listening_inodes(sock.getsockname()[1]))


def test_only_a_listener_inside_the_engine_group_counts_as_the_engine():
    """The check behind "ready": /health may be answered by anyone; the socket must be the group's."""
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        with listening() as sock:
            port = sock.getsockname()[1]
            assert group_listens_on(os.getpgrp(), port)  # this test's own group holds it
            assert not group_listens_on(stranger.pid, port)  # another group does not
    finally:
        stranger.kill()
        stranger.wait()


def test_identity_tells_a_process_from_a_recycled_pid():
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        identity = procfs.identity(child.pid)
        assert identity is not None and procfs.is_alive(identity)
        assert not procfs.is_alive(procfs.ProcessIdentity(child.pid, identity.start + 1))
        assert procfs.group_members(child.pid) == [child.pid]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert not procfs.is_alive(identity)
    assert procfs.group_members(child.pid) == []
    assert procfs.boot_id()
