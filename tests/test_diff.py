"""`vdeploy diff` through the real CLI: lock pairs made by `vdeploy lock` against the fake Hub,
git revisions in a real repository, and run records written by the code `up` records with."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from manifests import TEST_ENGINE, pin_engine

from vdeploy.diff import GROUPS
from vdeploy.engine import installed_engine
from vdeploy.lockfile import loads_lock

CONFIG = b'{"architectures": ["TinyModel"]}\n'
WEIGHTS = bytes(range(256)) * 80  # 20,480 bytes, LFS
GENERATION = b'{"temperature": 0.6, "top_p": 0.9, "transformers_version": "4.57.0"}\n'
TEMPLATE = b"{% for m in messages %}{{ m.content }}\n{% endfor %}"
FILES = {
    "config.json": CONFIG,
    "model.safetensors": WEIGHTS,
    "tokenizer.json": b'{"version": "1.0"}\n',
    "tokenizer_config.json": b'{"bos_token": "<s>"}\n',
    "generation_config.json": GENERATION,
    "chat_template.jinja": TEMPLATE,
    "README.md": b"# a model\n",
}


def hub_manifest(repo: str, serve: str = "", runtime: str = "", extra: str = "") -> str:
    return f'[model]\nrepo = "{repo}"\n\n[serve]\n{serve}\n\n[runtime]\n{runtime}\n{extra}'


def keep(project, name: str) -> Path:
    """A copy of the project's current lock, to compare later locks with."""
    return Path(shutil.copy(project.lock, project.folder / name))


def diff(project, *args, expect: int = 1, env: dict | None = None, cwd: Path | None = None) -> str:
    _, out, err = project.run_vdeploy("diff", *args, expect=expect, env=env, cwd=cwd)
    assert "Traceback" not in err
    return out


def sections(report: str) -> dict[str, list[str]]:
    """The report's groups: "weights: changes outputs" → its change lines (details left out)."""
    found: dict[str, list[str]] = {}
    current = None
    for line in report.splitlines():
        if line.endswith(": not compared"):
            current = None
        elif not line.startswith(" ") and ": " in line and not line.startswith(("old: ", "new: ")):
            current = line
            found[current] = []
        elif current is not None and line.startswith("  ") and not line.startswith(("    ", "  note: ")):
            found[current].append(line.strip())
    return found


def lock_pair(project, before: str, after: str) -> str:
    """Lock the manifest `before`, keep that lock, lock `after`; the diff of the two."""
    project.write_manifest(before)
    project.run_vdeploy("lock")
    keep(project, "before.lock")
    project.write_manifest(after)
    project.run_vdeploy("lock")
    return diff(project, "before.lock")


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# ---- sources: a moved branch -----------------------------------------------------------------


@pytest.fixture
def moved(project, fake_hub, repo_id):
    """A lock at main, kept as before.lock, then `lock --update` after a push to main."""
    first = fake_hub.commit(repo_id, FILES)
    project.write_manifest(hub_manifest(repo_id))
    project.run_vdeploy("lock")
    keep(project, "before.lock")
    second = fake_hub.commit(repo_id, {
        "model.safetensors": bytes(range(256)) * 84,  # 21,504 bytes
        "model-2.safetensors": bytes(range(128)) * 100,
        "tokenizer.json": b'{"version": "1.1"}\n',
        "tokenizer_config.json": b'{"bos_token": "<s>", "chat_template": "{{ x }}"}\n',
        "generation_config.json": b'{"temperature": 0.7, "top_k": 20, "top_p": 0.9, "transformers_version": "4.57.1"}\n',
        "chat_template.jinja": TEMPLATE.replace(b"m.content", b"m.content | trim"),
        "README.md": b"# a model, now better\n",
    })
    _, _, err = project.run_vdeploy("lock", "--update")
    return repo_id, first, second, err


def test_moved_branch_reports_every_source_group_with_sizes_texts_and_keys(project, moved):
    repo, first, second, _ = moved
    report = diff(project, "before.lock")
    groups = sections(report)
    assert list(groups) == [
        "weights: changes outputs", "weights: operational", "tokenizer: changes outputs",
        "chat template: changes outputs", "sampling defaults: changes outputs", "sampling defaults: operational",
    ]
    new_weights = bytes(range(256)) * 84
    old_sha, new_sha = hashlib.sha256(WEIGHTS).hexdigest(), hashlib.sha256(new_weights).hexdigest()
    assert groups["weights: changes outputs"] == [
        f"model source {repo} main changed: {first[:12]} → {second[:12]}",
        f"model-2.safetensors added: 12,800 bytes, sha256 {hashlib.sha256(bytes(range(128)) * 100).hexdigest()[:12]}",
        f"model.safetensors changed: 20,480 bytes, sha256 {old_sha[:12]} → 21,504 bytes, sha256 {new_sha[:12]}",
    ]
    assert [line.split(":")[0] for line in groups["weights: operational"]] == ["README.md changed"]
    assert [line.split(":")[0] for line in groups["tokenizer: changes outputs"]] == [
        "tokenizer.json changed", "tokenizer_config.json changed",
    ]
    assert '    +{"bos_token": "<s>", "chat_template": "{{ x }}"}' in report  # where default templates live
    assert groups["sampling defaults: changes outputs"] == ["temperature changed: 0.6 → 0.7", "top_k added: 20"]
    assert groups["sampling defaults: operational"] == ["transformers_version changed: 4.57.0 → 4.57.1"]
    # The template file of the repo, as a unified diff of its texts.
    assert "    -{% for m in messages %}{{ m.content }}" in report
    assert "    +{% for m in messages %}{{ m.content | trim }}" in report
    assert report.splitlines()[-1] == "10 differences; 8 can change outputs"
    assert report.splitlines()[0].startswith("old: before.lock (lock, deployment ")
    assert report.splitlines()[1].startswith("new: vdeploy.lock (lock, deployment ")


def test_lock_update_prints_the_same_report_before_writing(project, moved):
    _, _, _, err = moved
    assert "lock --update changes:" in err
    update = err[err.index("lock --update changes:"):]
    assert "model.safetensors changed: 20,480 bytes" in update
    assert "temperature changed: 0.6 → 0.7" in update
    assert "10 differences; 8 can change outputs" in update
    # Printed before the lock is written: the line saying so comes last.
    assert err.index("10 differences") < err.index("wrote ")


def test_texts_not_in_the_store_are_named_by_file_and_hash(project, moved, tmp_path):
    elsewhere = tmp_path / "empty-home"
    elsewhere.mkdir()
    report = diff(project, "before.lock", env={"HF_HOME": str(elsewhere)})
    groups = sections(report)
    assert [line.split(":")[0] for line in groups["sampling defaults: changes outputs"]] == [
        "generation_config.json changed"
    ]
    assert "texts are not in the store" in report
    assert "{{ m.content | trim }}" not in report


def test_sides_swap_and_a_lock_against_itself_is_the_same_deployment(project, moved):
    forward = diff(project, "before.lock", "vdeploy.lock")
    assert forward == diff(project, "before.lock")
    backward = diff(project, "vdeploy.lock", "before.lock")
    assert "model.safetensors changed: 21,504 bytes" in backward and "model-2.safetensors removed" in backward
    same = diff(project, "before.lock", str(project.folder / "before.lock"), expect=0)
    assert same.splitlines()[-1] == "same deployment"
    # A project folder and a manifest each mean their lock.
    assert diff(project, ".", "vdeploy.toml", expect=0).splitlines()[-1] == "same deployment"


# ---- chat template, flags, seed, environment, engine ----------------------------------------


def test_changed_chat_template_shows_a_unified_diff(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    (project.folder / "chat.jinja").write_text("{{ messages[0].content }}\nline two\n")
    project.write_manifest(hub_manifest(repo_id, extra='\n[chat-template]\nfile = "chat.jinja"\n'))
    project.run_vdeploy("lock")
    keep(project, "before.lock")
    (project.folder / "chat.jinja").write_text("{{ messages[-1].content }}\nline two\n")
    project.run_vdeploy("lock")
    report = diff(project, "before.lock")
    old, new = (loads_lock((project.folder / n).read_text()).chat_template.sha256 for n in ("before.lock", "vdeploy.lock"))
    assert sections(report) == {"chat template: changes outputs": [f"[chat-template] changed: {old[:12]} → {new[:12]}"]}
    assert "    -{{ messages[0].content }}" in report and "    +{{ messages[-1].content }}" in report
    assert "     line two" in report  # context
    assert report.splitlines()[-1] == "1 difference; 1 can change outputs"


def test_serve_flags_are_split_by_the_classification_table(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    report = lock_pair(
        project,
        hub_manifest(repo_id, serve='dtype = "float32"\nport = 8000\n'),
        hub_manifest(repo_id, serve='dtype = "bfloat16"\nport = 8001\nmax-num-queued-reqs = 64\n'),
    )
    assert sections(report) == {
        "serve flags: changes outputs": ["dtype changed: float32 → bfloat16"],
        "serve flags: unknown (treated as changes outputs)": ["max-num-queued-reqs added: 64"],
        "serve flags: operational": ["port changed: 8000 → 8001"],
    }
    assert report.splitlines()[-1] == "3 differences; 2 can change outputs"

    # An operational flag alone keeps the deployment id, yet is a difference (exit 1).
    keep(project, "middle.lock")
    project.write_manifest(hub_manifest(repo_id, serve='dtype = "bfloat16"\nport = 9000\nmax-num-queued-reqs = 64\n'))
    project.run_vdeploy("lock")
    data = json.loads(diff(project, "middle.lock", "--json"))
    assert data["old"]["deployment"] == data["new"]["deployment"]
    assert (data["same"], data["differences"], data["changes_outputs"]) == (False, 1, 0)
    assert data["summary"] == "1 difference; 0 can change outputs"


def test_seed_and_pinned_environment_by_prefix(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    report = lock_pair(
        project,
        hub_manifest(repo_id, runtime='seed = 0\nenv = { VLLM_CPU_KVCACHE_SPACE = "1", HF_HUB_DISABLE_PROGRESS_BARS = "1" }\n'),
        hub_manifest(repo_id, runtime=(
            'seed = 7\nenv = { VLLM_CPU_KVCACHE_SPACE = "2", HF_HUB_DISABLE_PROGRESS_BARS = "0", MY_SETTING = "x" }\n'
        )),
    )
    assert sections(report) == {
        "seed: changes outputs": ["seed changed: 0 → 7"],
        "pinned environment: changes outputs": ["VLLM_CPU_KVCACHE_SPACE changed: 1 → 2"],
        "pinned environment: unknown (treated as changes outputs)": ["MY_SETTING added: x"],
        "pinned environment: operational": ["HF_HUB_DISABLE_PROGRESS_BARS changed: 1 → 0"],
    }
    assert report.splitlines()[-1] == "4 differences; 3 can change outputs"


def test_new_engine_and_its_pins(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    distribution, version = TEST_ENGINE.split("==")
    (project.folder / "engine.txt").write_text(f"{TEST_ENGINE}\ntorch==2.9.0\n")
    project.write_manifest(hub_manifest(repo_id, runtime='engine-environment = "engine.txt"\n'))
    project.run_vdeploy("lock")
    keep(project, "before.lock")
    (project.folder / "engine.txt").write_text(f"{distribution}=={version}.post1\ntorch==2.9.1\ntransformers==4.57.0\n")
    project.run_vdeploy("lock")
    report = diff(project, "before.lock")
    lines = sections(report)["engine: changes outputs"]
    assert lines[0].startswith("engine-environment sha256 changed: ")
    assert lines[1:] == [  # by package name
        "torch changed: 2.9.0 → 2.9.1",
        "transformers added: 4.57.0",
        f"{distribution} changed: {version} → {version}.post1",
    ]
    assert report.splitlines()[-1] == "4 differences; 4 can change outputs"


def test_changed_remote_code_shows_its_text(project, fake_hub, repo_id):
    config = b'{"architectures": ["TinyForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}}'
    fake_hub.commit(repo_id, {**FILES, "config.json": config, "modeling_tiny.py": b"class TinyForCausalLM:\n    pass\n"})
    project.write_manifest(hub_manifest(repo_id, extra='\n[policy]\ntrust-remote-code = "pinned"\n'))
    project.run_vdeploy("lock")
    keep(project, "before.lock")
    fake_hub.commit(repo_id, {"modeling_tiny.py": b"class TinyForCausalLM:\n    scale = 2\n"})
    project.run_vdeploy("lock", "--update")
    report = diff(project, "before.lock")
    groups = sections(report)
    assert [line.split(":")[0] for line in groups["remote code: changes outputs"]] == ["modeling_tiny.py changed"]
    assert "    -    pass" in report and "    +    scale = 2" in report
    # The model repo moved (no weights did), and what moved with it, its code, changes outputs.
    [moved_line] = groups["weights: changes outputs"]
    assert moved_line.startswith(f"model source {repo_id} main changed: ")


def test_a_format_1_lock_is_read_with_the_engine_it_recorded(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    project.write_manifest(hub_manifest(repo_id))
    project.run_vdeploy("lock")
    text = project.lock.read_text()
    lock = loads_lock(text)
    # The same lock as format 1 wrote it (its engine as found where lock ran; its id computed another way).
    engine = f'[engine]\ndistribution = "{lock.engine.distribution}"\nversion = "{lock.engine.version}"\nsource = "installed"\n'

    def format_1(torch: str) -> str:
        head = text.replace("version = 2\n", "version = 1\n", 1).replace(lock.deployment, "0" * 64).split("[engine]")[0]
        return head + engine + torch + "\n[runtime]" + text.split("[runtime]", 1)[1]

    (project.folder / "torch.lock").write_text(format_1('torch = "2.13.0+cpu"\n'))
    report = diff(project, "torch.lock")
    assert "  note: lock format 1: its deployment id is computed another way than format 2's" in report
    assert sections(report) == {"engine: changes outputs": ["torch removed (was 2.13.0+cpu)"]}

    # Nothing else differs, but the ids do: said, never "same deployment".
    (project.folder / "plain.lock").write_text(format_1(""))
    report = diff(project, "plain.lock")
    assert sections(report) == {
        "deployment: unknown (treated as changes outputs)": [f"deployment id changed: {'0' * 12} → {lock.deployment[:12]}"]
    }
    assert report.splitlines()[-1] == "1 difference; 1 can change outputs"


# ---- JSON and exit codes ---------------------------------------------------------------------


def test_json_has_every_group_in_order_with_classified_changes(project, moved):
    data = json.loads(diff(project, "before.lock", "--json"))
    assert data["format"] == 1
    assert [g["name"] for g in data["groups"]] == list(GROUPS)
    assert (data["differences"], data["changes_outputs"], data["same"]) == (10, 8, False)
    assert data["old"]["label"] == "before.lock" and data["new"]["kind"] == "lock"
    weights = next(g for g in data["groups"] if g["name"] == "weights")
    change = next(c for c in weights["changes"] if c["what"] == "model.safetensors")
    assert change["old"]["size"] == 20480 and change["new"]["size"] == 21504
    assert (change["effect"], change["changes_outputs"], change["group"]) == ("outputs", True, "weights")
    for group in data["groups"]:
        for item in group["changes"]:
            assert item["effect"] in ("outputs", "operational", "unknown")
            assert item["changes_outputs"] == (item["effect"] != "operational")
    hardware = next(g for g in data["groups"] if g["name"] == "hardware")
    assert hardware["compared"] is False
    same = json.loads(diff(project, "vdeploy.lock", "vdeploy.lock", "--json", expect=0))
    assert same["same"] is True and same["summary"] == "same deployment" and same["differences"] == 0


def test_unreadable_inputs_exit_2_with_one_line(project, fake_hub, repo_id, tmp_path):
    fake_hub.commit(repo_id, FILES)
    project.write_manifest(hub_manifest(repo_id))
    project.run_vdeploy("lock")
    (project.folder / "garbage.lock").write_text("this is [not a lock")
    (project.folder / "newer.lock").write_text(project.lock.read_text().replace("version = 2", "version = 99"))
    (project.folder / "empty").mkdir()
    cases = {
        "missing.lock": "missing.lock: no such file or folder",
        "garbage.lock": "not a readable lock",
        "newer.lock": "upgrade vdeploy",
        "empty": "holds no vdeploy.lock",
        "git:HEAD": "is not inside a git repository",
    }
    for arg, words in cases.items():
        _, _, err = project.run_vdeploy("diff", arg, expect=2, cwd=tmp_path if arg.startswith("git:") else None)
        assert words in one_error_line(err), (arg, err)
    _, _, err = project.run_vdeploy("diff", "garbage.lock", "--json", expect=2)
    assert "not a readable lock" in one_error_line(err)


# ---- git revisions -------------------------------------------------------------------------


def git(folder: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", *args],
        cwd=folder, check=True, capture_output=True, text=True,
    ).stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_revisions_as_sides(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, FILES)
    repo_root = project.folder
    sub = repo_root / "proj"
    sub.mkdir()
    (sub / "vdeploy.toml").write_text(pin_engine(hub_manifest(repo_id, serve='dtype = "float32"\n')))
    project.run_vdeploy("lock", "proj")
    git(repo_root, "init", "-q")
    git(repo_root, "add", "proj/vdeploy.toml", "proj/vdeploy.lock")
    git(repo_root, "commit", "-q", "-m", "first")

    # Nothing uncommitted: `diff` alone is the same deployment.
    assert diff(project, expect=0, cwd=sub).splitlines()[-1] == "same deployment"

    (sub / "vdeploy.toml").write_text(pin_engine(hub_manifest(repo_id, serve='dtype = "bfloat16"\n')))
    project.run_vdeploy("lock", "proj")
    working = diff(project, cwd=sub)
    assert working.splitlines()[0].startswith("old: git:HEAD:./vdeploy.lock (lock, ")
    assert sections(working) == {"serve flags: changes outputs": ["dtype changed: float32 → bfloat16"]}

    git(repo_root, "commit", "-q", "-am", "second")
    expected = sections(working)
    # git:REV means the current folder's lock; PATH is from the root, or from here with ./ or ../
    assert sections(diff(project, "git:HEAD~1", cwd=sub)) == expected
    assert sections(diff(project, "git:HEAD~1", "git:HEAD", cwd=sub)) == expected
    assert sections(diff(project, "git:HEAD~1:proj", "git:HEAD:proj/vdeploy.toml", cwd=repo_root)) == expected
    assert sections(diff(project, "git:HEAD~1:proj/vdeploy.lock", "git:HEAD:./vdeploy.lock", cwd=sub)) == expected
    assert sections(diff(project, "git:HEAD~1:../proj/vdeploy.lock", "vdeploy.lock", cwd=sub)) == expected
    for spec, words in {
        "git:HEAD~5": "no such revision 'HEAD~5'",
        "git:HEAD:nope/vdeploy.lock": "HEAD has no nope/vdeploy.lock",
        "git:": "name a revision",
    }.items():
        _, _, err = project.run_vdeploy("diff", spec, expect=2, cwd=sub)
        assert words in one_error_line(err), (spec, err)


# ---- run records -----------------------------------------------------------------------------


def record_run(project, monkeypatch, caller_env: dict[str, str], port: int | None = None) -> Path:
    """A run record written by the code `up` writes it with, for a run that is not launched."""
    from vdeploy.launch import engine_env, start_record
    from vdeploy.prepare import Options, prepare

    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(project.cache))
    monkeypatch.setenv("HF_HOME", str(project.home))
    prepared = prepare(project.folder, Options(port=port), caller_env=caller_env)
    record = start_record(prepared, engine_env(prepared, caller_env, pure=False), pure=False)
    return record.folder


@pytest.fixture
def recorded(project, fake_hub, repo_id):
    first = fake_hub.commit(repo_id, FILES)
    project.write_manifest(hub_manifest(repo_id, serve='dtype = "float32"\n', runtime='env = { VLLM_CPU_KVCACHE_SPACE = "1" }\n'))
    project.run_vdeploy("lock")
    return repo_id, first


def test_a_run_against_its_own_lock(project, recorded, monkeypatch):
    run = record_run(project, monkeypatch, {"OMP_NUM_THREADS": "2", "PATH": "/usr/bin"})
    code, out, err = project.run_vdeploy("diff", run, "vdeploy.lock", expect=None)
    assert "Traceback" not in err
    assert out.splitlines()[0].startswith(f"old: {run} (record, deployment ")
    assert "  note: its lock: " in out
    # What the run inherited is said, but a lock inherits nothing: not a difference.
    assert "the run inherited OMP_NUM_THREADS=2" in out
    if installed_engine() is not None:
        assert (code, out.splitlines()[-1]) == (0, "same deployment")
    else:  # the run found no engine here, which the lock pins
        assert code == 1 and sections(out)["engine: unknown (treated as changes outputs)"][0].startswith("engine changed: unknown")


def test_two_runs_differ_in_inherited_variables_and_overrides(project, recorded, monkeypatch):
    one = record_run(project, monkeypatch, {"OMP_NUM_THREADS": "1", "HF_HUB_VERBOSITY": "info"})
    two = record_run(project, monkeypatch, {"OMP_NUM_THREADS": "2", "HF_HUB_VERBOSITY": "debug"}, port=8001)
    report = diff(project, one, two)
    assert sections(report) == {
        "serve flags: operational": ["port added: 8001"],
        "inherited environment: changes outputs": ["OMP_NUM_THREADS changed: 1 → 2"],
        "inherited environment: operational": ["HF_HUB_VERBOSITY changed: info → debug"],
    }
    assert report.splitlines()[-1] == "3 differences; 1 can change outputs"
    data = json.loads(diff(project, one, two / "record.json", "--json"))
    assert data["old"]["kind"] == data["new"]["kind"] == "record"
    assert next(g for g in data["groups"] if g["name"] == "hardware")["compared"] is True

    # The same run on another machine: its record says another hardware class.
    for run, hardware in ((one, {"class": "x86_64-avx2", "cpus": 2}), (two, {"class": "x86_64-avx512-amx", "cpus": 2})):
        record = json.loads((run / "record.json").read_text())
        (run / "record.json").write_text(json.dumps({**record, "hardware": hardware}))
    assert sections(diff(project, one, two))["hardware: changes outputs"] == ["class changed: x86_64-avx2 → x86_64-avx512-amx"]
    record = json.loads((one / "record.json").read_text())
    (one / "record.json").write_text(json.dumps({**record, "hardware": {"cpus": 2}}))  # a record from before classes
    assert sections(diff(project, one, two))["hardware: unknown (treated as changes outputs)"] == [
        "class changed: unknown → x86_64-avx512-amx"
    ]

    # Pure: reading records and planning the lock side imports no engine, no Hub client.
    probe = (
        "import sys\nfrom vdeploy.cli import app\n"
        f"try:\n    app(['diff', {str(one)!r}, 'vdeploy.lock'])\nexcept SystemExit:\n    pass\n"
        "print('HEAVY', [m for m in ('vllm', 'torch', 'huggingface_hub', 'transformers') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=project.folder, env=project.env(), capture_output=True, text=True)
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_a_run_whose_lock_moved_on(project, recorded, monkeypatch, fake_hub):
    repo, first = recorded
    run = record_run(project, monkeypatch, {})
    ran_from = keep(project, "ran-from.lock")
    assert (run / "vdeploy.lock").read_bytes() == ran_from.read_bytes()  # a run keeps the lock it ran
    (run / "vdeploy.lock").unlink()  # as in a run folder from before runs kept it
    second = fake_hub.commit(repo, {"model.safetensors": bytes(range(256)) * 84})
    project.run_vdeploy("lock", "--update")
    report = diff(project, run)
    expected = {"weights: changes outputs": [f"model source changed: {repo} ({first[:12]}) → {repo} ({second[:12]})"]}
    if installed_engine() is None:  # the run found no engine here, which the lock pins
        expected["engine: unknown (treated as changes outputs)"] = [f"engine changed: unknown → {TEST_ENGINE}"]
    assert sections(report) == expected
    assert "its lock was not found" in report and "files are compared by commit only" in report

    # A run folder that keeps the lock it ran from is compared file by file.
    shutil.copy(ran_from, run / "vdeploy.lock")
    report = diff(project, run)
    assert [line.split(":")[0] for line in sections(report)["weights: changes outputs"]] == [
        f"model source {repo} main changed", "model.safetensors changed",
    ]
    assert f"its lock: {run / 'vdeploy.lock'}" in report


def test_an_older_record_reads_as_unknown_not_a_crash(project, recorded):
    runs = project.folder / ".vdeploy" / "runs"
    runs.mkdir(parents=True)
    deployment = loads_lock(project.lock.read_text()).deployment
    # Format 0: a flat <run-id>.json, without kind, engine packages, hardware class or inherited.
    (runs / "20250101T000000000000Z-old.json").write_text(json.dumps({"deployment": deployment, "argv": ["vllm", "serve", "x"]}))
    code, out, err = project.run_vdeploy("diff", runs / "20250101T000000000000Z-old.json", "vdeploy.lock", expect=1)
    assert "Traceback" not in err
    groups = sections(out)
    assert "engine changed: unknown" in groups["engine: unknown (treated as changes outputs)"][0]
    assert out.splitlines()[-1].endswith("can change outputs")
