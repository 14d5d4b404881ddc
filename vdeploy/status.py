"""Step 7 of the flow: the runs that live now (`vdeploy status`) and stopping one (`vdeploy down`).

A run is live while the processes its record names run (records.run_state asks the machine, not
the record). `down` asks the run's supervisor to stop (SIGTERM, after leaving a note saying who
asked, so the record says "down"); where the supervisor is gone it stops the engine's group
itself and completes the record.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vdeploy import procfs
from vdeploy.errors import LaunchError
from vdeploy.records import (
    EXITED,
    STOP_REQUEST,
    RunRecord,
    list_records,
    now,
    read_record,
    registered_records,
    run_state,
    unregister_live,
)

HEALTH_PROBE_SECONDS = 0.5
HEALTH_REQUEST_SECONDS = 2
DOWN_EXTRA_SECONDS = 10  # beyond the supervisor's grace period, for it to write the record


@dataclass(frozen=True)
class StatusRow:
    record: RunRecord
    state: str
    healthy: bool | None  # None: not asked (the run has exited)
    uptime_seconds: float | None

    def to_json(self) -> dict[str, Any]:
        return {**self.record.listing(self.state), "healthy": self.healthy, "uptime_seconds": self.uptime_seconds}

    def describe(self) -> str:
        record = self.record
        if self.state == EXITED:
            code = "?" if record.exit_code is None else record.exit_code
            health = f"exit {code}"
        else:
            health = "healthy" if self.healthy else "not answering"
        uptime = "" if self.uptime_seconds is None else _duration(self.uptime_seconds)
        pid = record.supervisor_pid or record.pid or "-"
        return (f"{record.run_id}  {record.kind:<3}  {self.state:<8}  {health:<13}  pid {pid:<7}  {record.url}  "
                f"{record.deployment[:16]}  {uptime}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _age(started: str) -> float | None:
    try:
        return (datetime.now(timezone.utc) - datetime.fromisoformat(started)).total_seconds()
    except ValueError:
        return None


def answers_health(url: str, timeout: float = HEALTH_REQUEST_SECONDS) -> bool:
    """GET /health answers 200 (HTTPS without certificate checks: it is a server we started)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme == "https":
        import ssl

        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path.rstrip("/") + "/health")
        return connection.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def status_rows(records: list[RunRecord]) -> list[StatusRow]:
    """One row per run not completed: live ones asked for /health, gone ones shown as exited."""
    rows = []
    for record in records:
        if record.completed:
            continue
        state = run_state(record)
        live = state != EXITED
        rows.append(StatusRow(
            record=record,
            state=state,
            healthy=answers_health(record.url, HEALTH_PROBE_SECONDS) if live else None,
            uptime_seconds=_age(record.started) if live else None,
        ))
    return rows


def project_status(project: Path) -> list[StatusRow]:
    return status_rows(list_records(project))


def machine_status() -> list[StatusRow]:
    return status_rows(registered_records())


def choose_run(project: Path, run_id: str | None, manifest: Path) -> RunRecord:
    """The run `down` stops: the one named (an id or a unique prefix), else the only live one."""
    records = list_records(project)
    if run_id is not None:
        matches = [r for r in records if r.run_id == run_id] or [r for r in records if r.run_id.startswith(run_id)]
        if not matches:
            raise LaunchError(f"no run {run_id!r} in {project / '.vdeploy' / 'runs'}; `vdeploy status` lists the live ones")
        if len(matches) > 1:
            raise LaunchError(f"run id {run_id!r} matches {len(matches)} runs; give more of it")
        chosen = matches[0]
        if chosen.completed:
            raise LaunchError(f"run {chosen.run_id} already ended (exit {chosen.exit_code}, {chosen.stopped})")
        return chosen
    live = [r for r in records if not r.completed and run_state(r) != EXITED]
    if not live:
        raise LaunchError(f"no live deployment of {manifest}; `vdeploy status` lists them")
    if len(live) > 1:
        raise LaunchError(f"{len(live)} live deployments of {manifest}: {', '.join(r.run_id for r in live)}; name one")
    return live[0]


def stop_run(record: RunRecord, say: Callable[[str], None]) -> RunRecord:
    """Stop a run the way its supervisor stops it, and return its completed record."""
    from vdeploy.processes import STOP_GRACE_SECONDS, group_alive, stop_groups

    supervisor = (procfs.ProcessIdentity(record.supervisor_pid, record.supervisor_start)
                  if record.supervisor_pid is not None and record.supervisor_start is not None else None)
    if supervisor is not None and procfs.is_alive(supervisor):
        (record.folder / STOP_REQUEST).write_text("down\n", encoding="utf-8")
        try:
            os.kill(supervisor.pid, signal.SIGTERM)
        except PermissionError:
            raise LaunchError(f"run {record.run_id} is supervised by another user's process (pid {supervisor.pid}); "
                              "stop it as that user") from None
        deadline = time.monotonic() + STOP_GRACE_SECONDS + DOWN_EXTRA_SECONDS
        while procfs.is_alive(supervisor) and time.monotonic() < deadline:
            time.sleep(0.1)
        ended = read_record(record.path)
        if ended.completed:
            return ended
        record = ended
    engine = record.pid is not None and (
        procfs.is_alive(procfs.ProcessIdentity(record.pid, record.pid_start)) if record.pid_start is not None
        else group_alive(record.pid)
    )
    if engine:
        say(f"the supervisor of {record.run_id} is gone; stopping vLLM's process group {record.pid} itself")
        stop_groups([(record.pid, None)])
        record.reason = "its supervisor was gone; `vdeploy down` stopped vLLM"
    else:
        record.reason = record.reason or "its processes were gone before `vdeploy down`"
    record.stopped = now()
    record.stopped_by = "down"
    record.save()
    unregister_live(record)
    return record
