"""Run records: what was launched, from which lock, on which machine, and how it ended.

One typed, versioned record per run, read and written only here. A run has a folder beside the
manifest, `.vdeploy/runs/<run-id>/`, holding `record.json`, the run's logs (`engine.log`, and for
`vdeploy run` `command.log`) and a copy of the lock that ran (`vdeploy.lock`). The record's `format` is read first; an older format is
upgraded by one function per version (as pipx does with its metadata), a newer one is refused.

Whether a run is live is never taken from the record alone: the record keeps its processes'
identities (pid and start time since boot, and the boot), and `run_state` asks the machine.
Runs started here and not yet completed are also listed machine-wide under vdeploy's cache
(`live/`), so `vdeploy status --all` finds every project's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vdeploy import procfs
from vdeploy.constants import RUNS_DIR, vdeploy_cache_dir

RECORD_FORMAT = 2
RECORD_NAME = "record.json"
ENGINE_LOG = "engine.log"
COMMAND_LOG = "command.log"
SUPERVISOR_LOG = "supervisor.log"  # what a detached supervisor itself said
STOP_REQUEST = "stop-request"  # written by `vdeploy down` before it signals the supervisor
LIVE_DIR = "live"

STARTING, RUNNING, EXITED = "starting", "running", "exited"


@dataclass
class CommandRecord:
    """The experiment `vdeploy run` ran against the deployment."""

    argv: list[str]
    cwd: str
    started: str | None = None
    stopped: str | None = None
    pid: int | None = None
    exit_code: int | None = None  # 128+N when a signal N ended it


@dataclass
class RunRecord:
    """One run of a deployment. Secrets never appear: variables holding them are redacted."""

    folder: Path  # .vdeploy/runs/<run-id>/, not stored in the file
    run_id: str
    kind: str  # "up", "run", "check"; an `up --detach` is "up" with detached = true
    deployment: str
    manifest: str
    argv: list[str]
    env: dict[str, str]  # what the engine got of the pinned and inherited variables, redacted
    inherited: dict[str, str]  # the caller's unpinned behaviour-changing variables, redacted
    pure: bool
    engine: dict[str, Any]  # the installed engine: distribution, version, packages
    engine_drift: list[dict[str, Any]]  # Change.to_json() of each difference from the lock
    url: str
    served_model_name: str
    started: str
    python: str = ""
    host: str = ""
    platform: str = ""
    hardware: dict[str, Any] = field(default_factory=dict)  # vdeploy.hardware; its "class" is compared
    node: dict[str, Any] | None = None  # multi-node: rank, nodes, master_addr, master_port, headless (nodes.node_facts)
    effective: dict[str, Any] = field(default_factory=dict)  # what vLLM chose (vdeploy.enginelog)
    detached: bool = False
    pid: int | None = None  # the engine's pid, also its process group
    pid_start: int | None = None  # its start time in clock ticks after boot: a recycled pid differs
    supervisor_pid: int | None = None  # the vdeploy process that started and watches the engine
    supervisor_start: int | None = None
    boot_id: str | None = None
    command: CommandRecord | None = None  # `vdeploy run`'s CMD
    ready: str | None = None
    stopped: str | None = None
    exit_code: int | None = None  # the supervising command's: 130 SIGINT, 143 SIGTERM, else the engine's or CMD's
    engine_exit_code: int | None = None  # vLLM's own (128+N when a signal N ended it)
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", "down", "command" (CMD ended), "engine" (vLLM ended)
    reason: str | None = None  # why the run failed or ended, in one line
    format: int = RECORD_FORMAT

    @property
    def path(self) -> Path:
        return self.folder / RECORD_NAME

    @property
    def engine_log(self) -> Path:
        return self.folder / ENGINE_LOG

    @property
    def command_log(self) -> Path:
        return self.folder / COMMAND_LOG

    @property
    def completed(self) -> bool:
        return self.stopped is not None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["folder"]
        return data

    def save(self) -> None:
        from vdeploy.atomic import write_atomically  # tempfile: only commands that write pay for it

        write_atomically(self.path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], folder: Path) -> RunRecord:
        known = {f.name for f in fields(cls)} - {"folder"}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("command"), Mapping):
            command_fields = {f.name for f in fields(CommandRecord)}
            values["command"] = CommandRecord(**{k: v for k, v in values["command"].items() if k in command_fields})
        return cls(folder=folder, **values)

    def listing(self, state: str | None = None) -> dict[str, Any]:
        """The record as `vdeploy runs --json` and `status --json` print it (schema in the README)."""
        return {
            **self.to_json(),
            "state": state or run_state(self),
            "record": str(self.path),
            "engine_log": str(self.engine_log),
            "command_log": str(self.command_log) if self.command is not None else None,
        }


class RecordError(ValueError):
    """A record file that cannot be read as a run record (skipped by listings)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def runs_dir(project: Path) -> Path:
    return project / RUNS_DIR


def new_run_id(deployment: str, started: datetime | None = None) -> str:
    """Sortable by start time, unique per process: 20261201T142936123456Z-<deployment[:12]>."""
    started = started or datetime.now(timezone.utc)
    return f"{started.strftime('%Y%m%dT%H%M%S%fZ')}-{deployment[:12]}"


def read_record(path: Path) -> RunRecord:
    """A record file (record.json in a run folder, or a format-0 flat `<run-id>.json`)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RecordError(f"{path}: not a readable run record ({exc})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{path}: not a run record")
    version = data.get("format", 0)
    if not isinstance(version, int) or version > RECORD_FORMAT:
        raise RecordError(f"{path}: run record format {version!r} is newer than this vdeploy reads; upgrade vdeploy")
    for upgrade in UPGRADES[version:]:
        data = upgrade(data, path)
    folder = path.parent if path.name == RECORD_NAME else path.with_suffix("")
    return RunRecord.from_json(data, folder)


def _upgrade_from_0(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 0: a flat `.vdeploy/runs/<run-id>.json`, no kind, drift as a string, `accelerator`."""
    upgraded = dict(data)
    upgraded["run_id"] = path.stem
    upgraded["kind"] = "up"
    drift = data.get("engine_drift")
    upgraded["engine_drift"] = [{"what": drift}] if isinstance(drift, str) else []
    upgraded["hardware"] = data.get("accelerator") or {}
    upgraded["format"] = 1
    return upgraded


def _upgrade_from_1(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """Format 1: `hardware` without a class (CPU name, CPU count, GPU lines): the class is unknown."""
    upgraded = dict(data)
    upgraded["hardware"] = {**(data.get("hardware") or {}), "class": None}
    upgraded["format"] = 2
    return upgraded


UPGRADES = [_upgrade_from_0, _upgrade_from_1]


def list_records(project: Path) -> list[RunRecord]:
    """Every readable run record of a project, oldest first."""
    folder = runs_dir(project)
    candidates = sorted(folder.glob(f"*/{RECORD_NAME}")) + sorted(folder.glob("*.json"))
    records = []
    for path in candidates:
        try:
            records.append(read_record(path))
        except RecordError:
            continue
    return sorted(records, key=lambda r: r.run_id)


def process_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recorded_alive(pid: int | None, start: int | None) -> bool:
    if pid is None:
        return False
    if start is None:  # a record older than format 2 kept no start time
        return process_alive(pid)
    return procfs.is_alive(procfs.ProcessIdentity(pid, start))


def is_live(record: RunRecord) -> bool:
    """Its supervisor or its engine still runs (the very processes recorded, on this boot)."""
    if record.completed:
        return False
    if record.boot_id is not None and record.boot_id != procfs.boot_id():
        return False
    return _recorded_alive(record.supervisor_pid, record.supervisor_start) or _recorded_alive(record.pid, record.pid_start)


def run_state(record: RunRecord) -> str:
    """starting / running / exited, from the record and the machine (a record whose processes are
    gone is exited, whatever it says)."""
    if not is_live(record):
        return EXITED
    return RUNNING if record.ready else STARTING


def live_dir() -> Path:
    return vdeploy_cache_dir() / LIVE_DIR


def register_live(record: RunRecord) -> None:
    """List the run machine-wide until it completes (`status --all`)."""
    from vdeploy.atomic import write_atomically

    write_atomically(live_dir() / record.run_id, str(record.path.resolve()).encode())


def unregister_live(record: RunRecord) -> None:
    (live_dir() / record.run_id).unlink(missing_ok=True)


def registered_records() -> list[RunRecord]:
    """Every run registered on this machine and not completed; entries whose record completed or
    vanished are dropped from the registry as they are found."""
    folder = live_dir()
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    records = []
    for entry in entries:
        try:
            record = read_record(Path(entry.read_text(encoding="utf-8").strip()))
        except (OSError, RecordError):
            entry.unlink(missing_ok=True)
            continue
        if record.completed:
            entry.unlink(missing_ok=True)
            continue
        records.append(record)
    return records
