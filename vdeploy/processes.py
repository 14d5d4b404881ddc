"""The process machinery a supervisor needs: process groups stopped as a whole, a parent-death
signal, a watchdog that outlives the supervisor, stop requests, and copying a child's output.

launch.py puts it together for `up` and `run`. vLLM's own children (EngineCore, workers) do not
watch their parent, so the parent-death signal on vLLM's main process alone would leave them
serving when a supervisor is SIGKILLed; the watchdog, outside the engine's group and session,
stops the whole group when the supervisor's pipe to it closes without a goodbye.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from vdeploy import procfs

STOP_GRACE_SECONDS = 20
KILL_WAIT_SECONDS = 5
POLL_SECONDS = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1

# The watchdog: started beside the engine, outside its group and session, with the supervisor's
# pipe as stdin. "watch PGID" adds a group, "release" ends it quietly; end of input without
# "release" means the supervisor died: every watched group is stopped as the supervisor would.
WATCHDOG = r"""
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
groups, grace = {int(sys.argv[1])}, float(sys.argv[2])
for line in sys.stdin:
    word, _, value = line.strip().partition(" ")
    if word == "release":
        sys.exit(0)
    if word == "watch":
        groups.add(int(value))
def send(sig, targets):
    alive = set()
    for group in targets:
        try:
            os.killpg(group, sig)
            alive.add(group)
        except (ProcessLookupError, PermissionError):
            pass
    return alive
alive = send(signal.SIGTERM, groups)
deadline = time.monotonic() + grace
while alive and time.monotonic() < deadline:
    time.sleep(0.2)
    alive = send(0, alive)
send(signal.SIGKILL, alive)
"""


def _prctl() -> Callable[..., int] | None:
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux: the watchdog alone stops the engine


def arm_parent_death(signum: int, parent: int, prctl: Callable[..., int] | None = None) -> None:
    """This process gets `signum` when `parent` (its parent now) dies; 0 disarms it."""
    prctl = prctl or _prctl()
    if prctl is None:
        return
    prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    if signum and os.getppid() != parent:  # the parent died before the signal was armed
        os.kill(os.getpid(), signum)


def die_with_parent(signum: int, terminal: int | None = None) -> Callable[[], None]:
    """A preexec function: the child gets `signum` when this process dies, and, given a terminal,
    takes it for its own process group (as a shell gives a job the terminal)."""
    prctl = _prctl()  # looked up here: the child should only call it
    parent = os.getpid()

    def preexec() -> None:
        arm_parent_death(signum, parent, prctl)
        if terminal is not None:
            take_terminal(terminal)

    return preexec


def foreground_terminal() -> int | None:
    """stdin's terminal, when this process's group holds it in the foreground; else None."""
    try:
        fd = sys.stdin.fileno()
        if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
            return fd
    except (OSError, ValueError, AttributeError):
        pass
    return None


def take_terminal(fd: int) -> None:
    """Make this process's group the terminal's foreground group (a background group may: SIGTTOU
    is ignored for the call)."""
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, previous)


def exit_status(returncode: int) -> int:
    """A child's return code as a shell shows it: 128 + N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


def group_alive(pgid: int) -> bool:
    """Any process of the group still runs (zombies, which only wait to be reaped, do not count)."""
    if os.path.isdir(f"{procfs.PROC}/{os.getpid()}"):
        return bool(procfs.group_members(pgid))
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def stop_groups(groups: Sequence[tuple[int, Any]], grace: float = STOP_GRACE_SECONDS,
                hurry: Callable[[], bool] = lambda: False) -> None:
    """SIGTERM each process group, wait up to the grace period (or until `hurry()`) for all of
    them to go, SIGKILL the rest. `groups` pairs each group id with its leader's Popen (reaped
    here), or None."""
    for pgid, _ in groups:
        signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    alive = [pgid for pgid, _ in groups]
    while alive and time.monotonic() < deadline and not hurry():
        time.sleep(POLL_SECONDS)
        alive = [pgid for pgid in alive if group_alive(pgid)]
    for pgid in alive:
        signal_group(pgid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_SECONDS  # SIGKILL is delivered, not waited for
    while alive and time.monotonic() < deadline:
        alive = [pgid for pgid in alive if group_alive(pgid)]
        time.sleep(POLL_SECONDS / 5)
    for _, process in groups:
        if process is not None:
            try:
                process.wait(timeout=5)  # dead or a zombie by now: this reaps it
            except Exception:  # noqa: BLE001 - a leader SIGKILL did not end is the kernel's to report
                pass


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP while vdeploy supervises: remembered (the first one names the
    stop), acted on by the supervising loop within a poll; a second one cuts the grace period
    short. Restores the previous handlers on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._remember)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _remember(self, signum: int, _frame: Any) -> None:
        self.count += 1
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def sleep(self, seconds: float) -> None:
        """Sleep, but not past a stop request."""
        deadline = time.monotonic() + seconds
        while not self.requested and time.monotonic() < deadline:
            time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0)))


class Watchdog:
    """The process that stops the engine's group (and CMD's) if the supervisor dies."""

    def __init__(self, process: Any) -> None:
        self.process = process

    @classmethod
    def start(cls, pgid: int, grace: float = STOP_GRACE_SECONDS) -> Watchdog:
        import subprocess

        process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", WATCHDOG, str(pgid), str(grace)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        return cls(process)

    def tell(self, line: str) -> None:
        try:
            self.process.stdin.write(f"{line}\n".encode())
            self.process.stdin.flush()
        except (OSError, ValueError):
            pass

    def release(self) -> None:
        """The supervisor stopped everything itself: the watchdog ends without a signal."""
        self.tell("release")
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except Exception:  # noqa: BLE001 - a watchdog slow to exit is harmless: it was released
            pass


class LogFollower(threading.Thread):
    """Copies what the engine writes to its log onto a stream, as it comes (foreground `up`)."""

    def __init__(self, path: Path, out: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.path, self.out = path, out
        self.done = threading.Event()

    def run(self) -> None:
        try:
            log = open(self.path, "rb")
        except OSError:
            return
        with log:
            while True:
                finished = self.done.is_set()
                chunk = log.read(1 << 16)
                if chunk:
                    self._write(chunk)
                elif finished:
                    return
                else:
                    self.done.wait(POLL_SECONDS)

    def _write(self, chunk: bytes) -> None:
        try:
            self.out.write(chunk)
            self.out.flush()
        except (OSError, ValueError):
            pass  # our own output is gone (a closed pipe): the log file still has everything

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)


class Tee(threading.Thread):
    """Copies a child's pipe to one of our streams and to a log file, as the bytes come."""

    def __init__(self, pipe: IO[bytes], out: IO[bytes], log_fd: int) -> None:
        super().__init__(daemon=True)
        self.pipe, self.out, self.log_fd = pipe, out, log_fd

    def run(self) -> None:
        fd = self.pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            os.write(self.log_fd, chunk)
            try:
                self.out.write(chunk)
                self.out.flush()
            except (OSError, ValueError):
                pass
