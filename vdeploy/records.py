"""Run records: what was launched, from which lock, on which machine, and how it ended.

One typed, versioned record per run, read and written only here. A run has a folder beside the
manifest, `.vdeploy/runs/<run-id>/`, holding `record.json` and the run's logs. The record's
`format` is read first; an older format is upgraded by one function per version (as pipx does
with its metadata), a newer one is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vdeploy.atomic import write_atomically
from vdeploy.constants import RUNS_DIR

RECORD_FORMAT = 1
RECORD_NAME = "record.json"
ENGINE_LOG = "engine.log"


@dataclass
class RunRecord:
    """One run of a deployment. Secrets never appear: variables holding them are redacted."""

    folder: Path  # .vdeploy/runs/<run-id>/, not stored in the file
    run_id: str
    kind: str  # "up", "run", "check"
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
    hardware: dict[str, Any] = field(default_factory=dict)
    pid: int | None = None  # the engine's pid, also its process group
    ready: str | None = None
    stopped: str | None = None
    exit_code: int | None = None
    stopped_by: str | None = None  # "SIGINT", "SIGTERM", ...
    reason: str | None = None  # why a launch failed before the engine answered
    format: int = RECORD_FORMAT

    @property
    def path(self) -> Path:
        return self.folder / RECORD_NAME

    @property
    def engine_log(self) -> Path:
        return self.folder / ENGINE_LOG

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["folder"]
        return data

    def save(self) -> None:
        write_atomically(self.path, (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode())

    @classmethod
    def from_json(cls, data: Mapping[str, Any], folder: Path) -> RunRecord:
        known = {f.name for f in fields(cls)} - {"folder"}
        return cls(folder=folder, **{k: v for k, v in data.items() if k in known})


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


UPGRADES = [_upgrade_from_0]


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
