"""`run`, `status`, `down` and `lock`'s dtype warning through the real CLI, where no engine needs to
start (issue 10); the launches are in tests/e2e/test_run.py and test_lifecycle.py."""

from __future__ import annotations

import json

import pytest

from vdeploy.records import RunRecord, now

CONFIG = b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "float32"}\n'


@pytest.fixture
def hub_model(fake_hub, repo_id) -> str:
    fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": b"\0" * 64})
    return repo_id


def one_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["run"], "put the command after --"),
    (["run", "a", "b", "--", "true"], "one manifest before --, not 2: a b"),
])
def test_run_needs_one_manifest_at_most_and_a_command_after_the_double_dash(project, args, says):
    _, _, stderr = project.run_vdeploy(*args, expect=2)
    assert says in stderr and "Traceback" not in stderr


def test_run_refuses_a_command_that_is_not_there_before_anything_starts(project):
    line = one_error(project.run_vdeploy("run", "--", "no-such-experiment-xyz", "--flag", expect=1)[2])
    assert line == "error: no-such-experiment-xyz: no executable of that name on the PATH; check the command after --"
    (project.folder / "eval.sh").write_text("#!/bin/sh\n")  # not executable
    line = one_error(project.run_vdeploy("run", "--", "./eval.sh", expect=1)[2])
    assert line.startswith("error: ./eval.sh: no executable of that name there")
    assert not (project.folder / ".vdeploy").exists()


@pytest.mark.parametrize("dtype, warned", [(None, True), ('"auto"', True), ('"float32"', False)])
def test_lock_warns_in_one_line_when_dtype_is_left_to_vllm(project, hub_model, dtype, warned):
    serve = "" if dtype is None else f"dtype = {dtype}\n"
    project.write_manifest(f'[model]\nrepo = "{hub_model}"\n\n[serve]\n{serve}')
    _, _, stderr = project.run_vdeploy("lock")
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    if warned:
        assert warnings == [
            f"warning: {project.manifest}: [serve] dtype is not pinned, so vLLM picks it per machine "
            "(a float32 checkpoint runs as bfloat16 on x86 CPUs); pin it, e.g. dtype = \"bfloat16\""
        ]
    else:
        assert warnings == []


def phantom(project, run_id: str) -> RunRecord:
    """A record whose supervisor and engine are gone without completing it (as after kill -9)."""
    folder = project.folder / ".vdeploy" / "runs" / run_id
    record = RunRecord(
        folder=folder, run_id=run_id, kind="up", deployment="d" * 64, manifest=str(project.manifest),
        argv=["vllm"], env={}, inherited={}, pure=False, engine={}, engine_drift=[], url="http://127.0.0.1:9",
        served_model_name="m", started=now(), pid=2**22 + 1, pid_start=1, supervisor_pid=2**22 + 2, supervisor_start=1,
    )
    record.save()
    return record


def test_status_runs_and_down_treat_a_run_whose_processes_are_gone_as_exited(project, hub_model):
    project.write_manifest(f'[model]\nrepo = "{hub_model}"\n')
    _, _, stderr = project.run_vdeploy("status")
    assert stderr.strip() == f"no live deployments of {project.manifest}"
    one_error(project.run_vdeploy("down", expect=1)[2])

    record = phantom(project, "20260101T000000000000Z-dddddddddddd")
    _, out, _ = project.run_vdeploy("status")
    assert record.run_id in out and " exited " in out and "exit ?" in out
    _, out, _ = project.run_vdeploy("runs")
    assert "exited ?" in out and "running" not in out
    listing = json.loads(project.run_vdeploy("runs", "--json")[1])
    assert [(r["run_id"], r["state"], r["stopped"]) for r in listing] == [(record.run_id, "exited", None)]

    # `down` without an id stops only live runs; named, it completes the phantom's record
    assert "no live deployment" in one_error(project.run_vdeploy("down", expect=1)[2])
    _, _, stderr = project.run_vdeploy("down", record.run_id[:12])
    assert f"stopped {record.run_id}" in stderr
    done = json.loads(record.path.read_text())
    assert done["stopped_by"] == "down" and done["stopped"] and "gone before" in done["reason"]
    assert json.loads(project.run_vdeploy("status", "--json")[1]) == []
    assert "already ended" in one_error(project.run_vdeploy("down", record.run_id, expect=1)[2])
