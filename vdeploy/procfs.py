"""The machine's processes and listening sockets, as Linux's /proc shows them.

Launch uses this to tell who holds a port (before vLLM starts), whether the server answering on
the port is the engine it started, and whether a recorded process is still the one it recorded
(a pid plus its start time since boot, so a recycled pid never passes for it). The parsers are
pure; the readers return nothing where /proc is missing or unreadable, and callers say so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

PROC = "/proc"
TCP_LISTEN = "0A"


@dataclass(frozen=True)
class Socket:
    address: str  # as the kernel writes it: hex, in network order per 32-bit word
    port: int
    state: str  # two hex digits; "0A" is LISTEN
    inode: int


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as it was when recorded: its pid and its start time, in clock ticks after boot."""

    pid: int
    start: int


def parse_tcp_table(text: str) -> list[Socket]:
    """The sockets of /proc/net/tcp or /proc/net/tcp6."""
    sockets = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or ":" not in fields[1]:
            continue
        address, _, port = fields[1].rpartition(":")
        try:
            sockets.append(Socket(address=address, port=int(port, 16), state=fields[3], inode=int(fields[9])))
        except ValueError:
            continue
    return sockets


def parse_stat(text: str) -> tuple[str, int, int] | None:
    """(state, process group, start time) from /proc/<pid>/stat; the command may hold spaces and ')'."""
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        return None
    try:
        return fields[0], int(fields[2]), int(fields[19])
    except ValueError:
        return None


def read_text(path: str) -> str | None:
    """A /proc file's text (path under /proc, with or without the prefix); None where unreadable."""
    if not path.startswith(PROC + "/"):
        path = PROC + path
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def listening_inodes(port: int) -> set[int]:
    """The inodes of every TCP socket listening on `port`, on any address, IPv4 or IPv6."""
    found = set()
    for table in ("tcp", "tcp6"):
        text = read_text(f"{PROC}/net/{table}")
        if text:
            found |= {s.inode for s in parse_tcp_table(text) if s.port == port and s.state == TCP_LISTEN and s.inode}
    return found


def pids() -> list[int]:
    try:
        return sorted(int(e) for e in os.listdir(PROC) if e.isdigit())
    except OSError:
        return []


def socket_inodes(pid: int) -> set[int]:
    """The sockets a process has open (empty if it is gone or not ours to read)."""
    folder = f"{PROC}/{pid}/fd"
    found = set()
    try:
        names = os.listdir(folder)
    except OSError:
        return found
    for name in names:
        try:
            target = os.readlink(f"{folder}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


def holders(inodes: set[int], candidates: Iterable[int] | None = None) -> list[int]:
    """The processes (among candidates, else all we can read) holding any of these sockets."""
    if not inodes:
        return []
    return [pid for pid in (pids() if candidates is None else candidates) if socket_inodes(pid) & inodes]


def stat(pid: int) -> tuple[str, int, int] | None:
    text = read_text(f"{PROC}/{pid}/stat")
    return parse_stat(text) if text else None


def group_members(pgid: int) -> list[int]:
    """The live (not zombie) processes of a process group."""
    members = []
    for pid in pids():
        found = stat(pid)
        if found and found[1] == pgid and found[0] != "Z":
            members.append(pid)
    return members


def identity(pid: int) -> ProcessIdentity | None:
    found = stat(pid)
    return None if found is None else ProcessIdentity(pid, found[2])


def is_alive(recorded: ProcessIdentity) -> bool:
    """The recorded process still runs: same pid, same start time, not a zombie."""
    found = stat(recorded.pid)
    return found is not None and found[0] != "Z" and found[2] == recorded.start


def boot_id() -> str | None:
    text = read_text(f"{PROC}/sys/kernel/random/boot_id")
    return text.strip() if text else None


def command_line(pid: int, limit: int = 120) -> str | None:
    raw = read_text(f"{PROC}/{pid}/cmdline")
    if not raw:
        return None
    line = " ".join(part for part in raw.split("\0") if part)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def describe_holders(port: int) -> str | None:
    """Who listens on `port`, for a message: "pid 123 (python -m http.server 8000)"; None if nobody
    we can see (another user's process shows as a socket without a readable owner)."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    owners = holders(inodes)
    if not owners:
        return "a process vdeploy cannot inspect (another user's?)"
    return ", ".join(f"pid {pid} ({command_line(pid) or 'command unreadable'})" for pid in owners)
