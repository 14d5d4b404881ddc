"""`vdeploy plan` and the checks `vdeploy up` makes before it starts anything (no engine launch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vdeploy.lockfile import loads_lock

from needs import needs_engine

CONFIG = b'{"architectures": ["LlamaForCausalLM"]}\n'
GENERATION = b'{"temperature": 0.6, "top_p": 0.95, "do_sample": true}\n'


def local_manifest(serve: str = "", runtime: str = "") -> str:
    return f"""[model]
path = "weights"

[chat-template]
text = "{{{{ messages }}}}"

[serve]
max-model-len = 128
{serve}
[runtime]
seed = 3
env = {{ OMP_NUM_THREADS = "2" }}
{runtime}
[store]
download-dir = "store"
"""


@pytest.fixture
def locked(project):
    weights = project.folder / "weights"
    weights.mkdir()
    (weights / "config.json").write_bytes(CONFIG)
    (weights / "generation_config.json").write_bytes(GENERATION)
    (weights / "model.safetensors").write_bytes(b"\0" * 4096)
    project.write_manifest(local_manifest())
    project.run_vdeploy("lock")
    return project


def plan_json(project, *args: str, env: dict[str, str] | None = None) -> dict:
    _, out, _ = project.run_vdeploy("plan", "--json", *args, env=env)
    return json.loads(out)


def flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_plan_passes_the_store_snapshot_seed_template_and_offline_environment(locked):
    lock = loads_lock(locked.lock.read_text())
    plan = plan_json(locked)
    argv = plan["argv"]
    snapshot = str(locked.folder / "store" / lock.model.name / "snapshots" / lock.model.commit)
    assert snapshot in argv
    assert flag(argv, "--seed") == "3"
    assert flag(argv, "--generation-config") == snapshot
    assert flag(argv, "--served-model-name") == "weights"  # no served-model-name: the source's name
    template = flag(argv, "--chat-template")
    assert template.endswith(f"{lock.chat_template.sha256}.jinja")
    assert open(template).read() == "{{ messages }}"
    assert flag(argv, "--max-model-len") == "128"
    assert flag(argv, "--fingerprint-value") == lock.deployment == plan["deployment"]
    assert plan["env"] == {
        "HF_HUB_CACHE": str(locked.folder / "store"),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "TRANSFORMERS_OFFLINE": "1",
    }
    assert plan["engine"]["version"] == lock.engine.version
    assert plan["sampling_defaults"] == {"temperature": 0.6, "top_p": 0.95}


def test_plan_text_shows_sampling_defaults_and_the_callers_unpinned_variables(locked):
    _, out, _ = locked.run_vdeploy("plan", env={"VLLM_LOGGING_LEVEL": "DEBUG", "HF_TOKEN": "hf_secretvalue"})
    assert "temperature=0.6" in out and "top_p=0.95" in out
    assert "VLLM_LOGGING_LEVEL=DEBUG" in out
    assert "HF_TOKEN=<redacted>" in out and "hf_secretvalue" not in out


def test_host_and_port_are_runtime_overrides_that_keep_the_deployment(locked):
    plain = plan_json(locked)
    moved = plan_json(locked, "--host", "127.0.0.1", "--port", "9123")
    assert moved["deployment"] == plain["deployment"]
    assert flag(moved["argv"], "--port") == "9123" and flag(moved["argv"], "--host") == "127.0.0.1"
    assert moved["url"] == "http://127.0.0.1:9123"


@needs_engine
def test_plan_is_the_same_argv_as_up_dry_run(locked):
    _, planned, _ = locked.run_vdeploy("plan")
    _, dry, _ = locked.run_vdeploy("up", "--dry-run")
    assert dry == planned


def test_plan_imports_neither_vllm_torch_nor_huggingface_hub(locked):
    probe = (
        "import sys\n"
        "from vdeploy.cli import app\n"
        "try:\n    app(['plan'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('vllm', 'torch', 'huggingface_hub', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=locked.folder, env=locked.env(),
                          capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_up_refuses_a_missing_lock(project):
    project.write_manifest(local_manifest())
    (project.folder / "weights").mkdir()
    _, _, err = project.run_vdeploy("up", "--dry-run", expect=1)
    assert "no lock yet; run `vdeploy lock` first" in error_line(err)


def test_up_refuses_a_stale_lock_and_names_the_change(locked):
    locked.write_manifest(local_manifest().replace("seed = 3", "seed = 4"))
    _, _, err = locked.run_vdeploy("up", "--dry-run", expect=1)
    line = error_line(err)
    assert "stale" in line and "runtime.seed changed: 3 → 4" in line and "vdeploy lock" in line


@needs_engine
def test_up_no_fetch_refuses_a_store_that_fails_verification(locked):
    lock = loads_lock(locked.lock.read_text())
    blob = locked.folder / "store" / lock.model.name / "blobs" / lock.model.file("model.safetensors").blob
    blob.unlink()
    _, _, err = locked.run_vdeploy("up", "--dry-run", "--no-fetch", expect=1)
    assert "missing: model: model.safetensors" in error_line(err)
    # without --no-fetch, up restores the store from the (unchanged) local folder, verified
    locked.run_vdeploy("up", "--dry-run")
    assert blob.is_file()


@needs_engine
def test_up_refuses_an_engine_other_than_the_locked_one_unless_allowed(locked):
    installed = loads_lock(locked.lock.read_text()).engine
    locked.write_manifest(local_manifest(runtime=f'engine = "{installed.distribution}==0.0.1"'))
    locked.run_vdeploy("lock")
    _, _, err = locked.run_vdeploy("up", "--dry-run", expect=1)
    line = error_line(err)
    assert f"{installed.distribution} 0.0.1 locked, {installed.version} installed" in line
    assert "--allow-engine-drift" in line
    _, out, err = locked.run_vdeploy("up", "--dry-run", "--allow-engine-drift")
    assert "engine drift allowed" in err and "--seed" in out


def test_a_draft_model_is_locked_fetched_and_passed_from_the_store(locked, fake_hub, repo_id):
    draft_commit = fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": b"\1" * 2048})
    serve = f'speculative-config = {{ model = "{repo_id}", num_speculative_tokens = 2 }}\n'
    locked.write_manifest(local_manifest(serve=serve))
    locked.run_vdeploy("lock")
    lock = loads_lock(locked.lock.read_text())
    assert (lock.draft.repo, lock.draft.commit) == (repo_id, draft_commit)
    assert [f.path for f in lock.draft.files] == ["config.json", "model.safetensors"]

    locked.run_vdeploy("fetch")
    snapshot = locked.folder / "store" / lock.draft.name / "snapshots" / draft_commit
    assert (snapshot / "model.safetensors").read_bytes() == b"\1" * 2048
    argv = plan_json(locked)["argv"]
    assert json.loads(flag(argv, "--speculative-config")) == {"model": str(snapshot), "num_speculative_tokens": 2}

    # like any source: a new upstream commit does not move it; a changed draft is a new deployment
    fake_hub.commit(repo_id, {"model.safetensors": b"\2" * 2048})
    locked.run_vdeploy("lock")
    assert loads_lock(locked.lock.read_text()).draft.commit == draft_commit
    locked.run_vdeploy("lock", "--update")
    assert loads_lock(locked.lock.read_text()).deployment != lock.deployment
