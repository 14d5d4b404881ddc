"""Trust and supply chain: remote code, pickles and hostile sources, through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vdeploy.lockfile import loads_lock

from needs import needs_engine

CONFIG = {"architectures": ["TinyForCausalLM"], "model_type": "tiny"}
WEIGHTS = bytes(range(256)) * 40
MODELING = b"class TinyForCausalLM:\n    pass\n"
CONFIGURATION = b"class TinyConfig:\n    pass\n"


def config_with(auto_map: dict) -> bytes:
    return json.dumps({**CONFIG, "auto_map": auto_map}).encode()


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def manifest(repo: str, policy: str = "", serve: str = "") -> str:
    return f'[model]\nrepo = "{repo}"\n\n[serve]\n{serve}\n\n[policy]\n{policy}\n'


def remote_code_repo(hub, repo: str, modeling: bytes = MODELING) -> str:
    return hub.commit(repo, {
        "config.json": config_with({
            "AutoConfig": "configuration_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
        }),
        "configuration_tiny.py": CONFIGURATION,
        "modeling_tiny.py": modeling,
        "model.safetensors": WEIGHTS,
    })


def stored_repos(project) -> list[str]:
    return sorted(p.name for p in project.store.glob("models--*")) if project.store.exists() else []


# ---- remote code -----------------------------------------------------------------------------


def test_remote_code_fails_to_lock_by_default_listing_what_and_how(project, fake_hub, repo_id):
    remote_code_repo(fake_hub, repo_id)
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = one_line(err)
    assert "needs remote code" in line
    assert "config.json auto_map.AutoModelForCausalLM = 'modeling_tiny.TinyForCausalLM'" in line
    assert "modeling_tiny.py" in line and 'trust-remote-code = "pinned"' in line
    assert not project.lock.exists() and stored_repos(project) == []


def test_pinned_remote_code_is_locked_verified_and_passed_with_its_commit(project, fake_hub, repo_id):
    commit = remote_code_repo(fake_hub, repo_id)
    project.write_manifest(manifest(repo_id, 'trust-remote-code = "pinned"'))
    project.run_vdeploy("lock")
    lock = loads_lock(project.lock.read_text())
    assert {(e.config, e.key, e.target) for e in lock.model.auto_map} == {
        ("config.json", "AutoConfig", "configuration_tiny.TinyConfig"),
        ("config.json", "AutoModelForCausalLM", "modeling_tiny.TinyForCausalLM"),
    }
    assert [f.path for f in lock.model.code_files] == ["configuration_tiny.py", "modeling_tiny.py"]

    _, out, _ = project.run_vdeploy("plan", "--json")
    plan = json.loads(out)
    argv = plan["argv"]
    assert "--trust-remote-code" in argv and argv[argv.index("--code-revision") + 1] == commit
    assert any("modeling_tiny.py sha256" in line for line in plan["code"])
    _, text, _ = project.run_vdeploy("plan")
    assert "remote code that will run" in text and "modeling_tiny.py" in text

    # the code files are verified like weights
    project.run_vdeploy("fetch")
    code = lock.model.file("modeling_tiny.py")
    blob = project.store / lock.model.name / "blobs" / code.blob
    blob.chmod(0o644)
    blob.write_bytes(MODELING.replace(b"pass", b"exec"))  # a different, longer file
    _, _, err = project.run_vdeploy("verify", expect=1)
    assert "mismatch: model: modeling_tiny.py" in err


def test_trust_remote_code_in_serve_is_refused_with_a_pointer_to_policy(project, fake_hub, repo_id):
    project.write_manifest(manifest(repo_id, serve="trust-remote-code = true"))
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = one_line(err)
    assert "[serve] trust-remote-code" in line and "[policy] trust-remote-code" in line


def test_a_tokenizer_auto_map_list_is_found(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {
        "config.json": json.dumps(CONFIG).encode(),
        "tokenizer_config.json": json.dumps({"auto_map": {"AutoTokenizer": ["tok.SlowTok", None]}}).encode(),
        "tok.py": b"class SlowTok: pass\n",
        "model.safetensors": WEIGHTS,
    })
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "tokenizer_config.json auto_map.AutoTokenizer = 'tok.SlowTok'" in one_line(err)


def test_code_from_another_repo_is_resolved_and_pinned_as_its_own_source(project, fake_hub, repo_id):
    code_repo = repo_id + "-code"
    code_commit = fake_hub.commit(code_repo, {"modeling_shared.py": MODELING, "README.md": b"code\n"})
    fake_hub.commit(repo_id, {
        "config.json": config_with({"AutoModelForCausalLM": f"{code_repo}--modeling_shared.TinyForCausalLM"}),
        "model.safetensors": WEIGHTS,
    })
    project.write_manifest(manifest(repo_id, 'trust-remote-code = "pinned"'))
    project.run_vdeploy("lock")
    lock = loads_lock(project.lock.read_text())
    assert [(s.repo, s.commit) for s in lock.code] == [(code_repo, code_commit)]
    assert [f.path for f in lock.code[0].files] == ["modeling_shared.py"]  # only code and configs

    _, out, _ = project.run_vdeploy("plan", "--json")
    argv = json.loads(out)["argv"]
    assert argv[argv.index("--code-revision") + 1] == code_commit

    # a new upstream commit of the code repo does not move the lock, --update does
    fake_hub.commit(code_repo, {"modeling_shared.py": MODELING + b"# v2\n"})
    project.run_vdeploy("lock")
    assert loads_lock(project.lock.read_text()).code[0].commit == code_commit
    _, _, err = project.run_vdeploy("lock", "--update")
    assert "modeling_shared.py changed" in err

    project.run_vdeploy("fetch")
    moved = loads_lock(project.lock.read_text()).code[0]
    snapshot = project.store / moved.name / "snapshots" / moved.commit / "modeling_shared.py"
    assert snapshot.read_bytes() == MODELING + b"# v2\n"


def test_code_in_another_repo_that_lacks_the_module_fails(project, fake_hub, repo_id):
    code_repo = repo_id + "-code"
    fake_hub.commit(code_repo, {"other.py": MODELING})
    fake_hub.commit(repo_id, {
        "config.json": config_with({"AutoModel": f"{code_repo}--modeling_shared.TinyModel"}),
        "model.safetensors": WEIGHTS,
    })
    project.write_manifest(manifest(repo_id, 'trust-remote-code = "pinned"'))
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "has no modeling_shared.py" in one_line(err)
    assert not project.lock.exists()


def test_lock_update_shows_code_changes_in_their_own_section_before_writing(project, fake_hub, repo_id):
    remote_code_repo(fake_hub, repo_id)
    project.write_manifest(manifest(repo_id, 'trust-remote-code = "pinned"'))
    project.run_vdeploy("lock")
    fake_hub.commit(repo_id, {
        "config.json": config_with({"AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}),
        "modeling_tiny.py": MODELING + b"import os\n",
        "configuration_tiny.py": None,
        "extra_code.py": b"x = 1\n",
    })
    _, _, err = project.run_vdeploy("lock", "--update")
    section = err[err.index("remote code: changes outputs"):err.index("wrote")]
    for expected in ("extra_code.py added", "configuration_tiny.py removed", "modeling_tiny.py changed"):
        assert expected in section


# ---- pickles ---------------------------------------------------------------------------------


def test_pickle_weights_are_refused_unless_allowed(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"config.json": json.dumps(CONFIG).encode(), "pytorch_model.bin": WEIGHTS})
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = one_line(err)
    assert "pickle weights run code when loaded (pytorch_model.bin)" in line and "allow-pickle = true" in line
    project.write_manifest(manifest(repo_id, "allow-pickle = true"))
    project.run_vdeploy("lock")
    assert loads_lock(project.lock.read_text()).model.file("pytorch_model.bin") is not None


def test_beside_safetensors_pickles_are_neither_locked_nor_fetched(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {
        "config.json": json.dumps(CONFIG).encode(),
        "model.safetensors": WEIGHTS,
        "pytorch_model.bin": WEIGHTS[::-1],
        "training_args.bin": b"pickled",
    })
    project.write_manifest(manifest(repo_id))
    project.run_vdeploy("lock")
    assert [f.path for f in loads_lock(project.lock.read_text()).model.files] == ["config.json", "model.safetensors"]
    fake_hub.clear_requests()
    project.run_vdeploy("fetch")
    assert not [path for _, path in fake_hub.requests if path.endswith(".bin")]


def test_load_format_pt_needs_allow_pickle(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": WEIGHTS})
    project.write_manifest(manifest(repo_id, serve='load-format = "pt"'))
    _, _, err = project.run_vdeploy("lock", expect=1)
    line = one_line(err)
    assert "[serve] load-format" in line and "allow-pickle" in line


# ---- hostile or broken sources ---------------------------------------------------------------


@pytest.mark.parametrize("hostile", ["/abs/evil", "ctl\x07name.json", "a\\b.json"])
def test_hostile_names_are_refused_before_anything_is_stored(project, fake_hub, repo_id, hostile):
    fake_hub.commit(repo_id, {"config.json": json.dumps(CONFIG).encode(), hostile: b"x"})
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert repr(hostile) in one_line(err)
    assert stored_repos(project) == [] and not project.lock.exists()


def test_names_that_collide_after_case_folding_are_refused(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"Config.json": b"{}", "config.json": json.dumps(CONFIG).encode()})
    project.write_manifest(manifest(repo_id))
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "differ only in case" in one_line(err)


def test_a_store_link_pointing_outside_the_store_fails_verification(project, fake_hub, repo_id, tmp_path):
    fake_hub.commit(repo_id, {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": WEIGHTS})
    project.write_manifest(manifest(repo_id))
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    lock = loads_lock(project.lock.read_text())
    entry = project.store / lock.model.name / "snapshots" / lock.model.commit / "config.json"
    outside = tmp_path / "planted.json"
    outside.write_bytes(json.dumps(CONFIG).encode())
    entry.unlink()
    entry.symlink_to(outside)
    _, _, err = project.run_vdeploy("verify", expect=1)
    assert "outside" in err and "Traceback" not in err


REWRITER = """
import os, random, sys
path, size = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
with open(path, "r+b", buffering=0) as out:
    while True:
        out.seek(rng.randrange(0, size - 65536))
        out.write(os.urandom(65536))
"""


def test_a_local_folder_that_changes_while_it_is_imported_is_refused(project):
    folder = project.folder / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_bytes(json.dumps(CONFIG).encode())
    shard = folder / "model.safetensors"
    size = 64 * 1024 * 1024
    shard.write_bytes(b"\0" * size)
    project.write_manifest('[model]\npath = "ckpt"\n\n[store]\ndownload-dir = "store"\n')

    # Another process rewrites the shard all the time, so the bytes hashed when the folder is
    # scanned are not the bytes copied into the store. A few tries absorb a starved writer.
    writer = subprocess.Popen([sys.executable, "-c", REWRITER, str(shard), str(size)])
    try:
        for _ in range(3):
            project.lock.unlink(missing_ok=True)
            code, _, err = project.run_vdeploy("lock", expect=None)
            if code != 0:
                break
    finally:
        writer.kill()
        writer.wait()
    assert code == 1, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err
    assert "model.safetensors changed while being imported" in errors[0]
    assert not project.lock.exists()
    stored = list((project.folder / "store").glob("models--*/snapshots/*/model.safetensors"))
    assert stored == []


# ---- tokens ----------------------------------------------------------------------------------

TOKEN = "hf_vdeployTestTokenThatMustNotLeak"


def gated_repo_manifest(project, fake_hub, repo_id) -> None:
    fake_hub.commit(repo_id, {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": WEIGHTS})
    fake_hub.gate(repo_id, TOKEN)
    project.write_manifest(manifest(repo_id))


def assert_the_token_is_nowhere(project, outputs: list[tuple[int, str, str]]) -> None:
    assert all(TOKEN not in out + err for _, out, err in outputs)
    assert TOKEN not in project.lock.read_text()
    for path in project.store.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_a_gated_repo_needs_hf_token_and_the_token_is_never_written(project, fake_hub, repo_id):
    gated_repo_manifest(project, fake_hub, repo_id)
    _, _, err = project.run_vdeploy("lock", expect=1)
    assert "gated repo" in one_line(err) and "HF_TOKEN" in err

    env = {"HF_TOKEN": TOKEN}
    outputs = [project.run_vdeploy(*args, env=env) for args in
               (("lock",), ("fetch",), ("verify",), ("plan",), ("plan", "--json"))]
    assert "HF_TOKEN=<redacted>" in outputs[3][1]
    assert_the_token_is_nowhere(project, outputs)


@needs_engine
def test_up_dry_run_of_a_gated_repo_never_shows_or_writes_the_token(project, fake_hub, repo_id):
    gated_repo_manifest(project, fake_hub, repo_id)
    env = {"HF_TOKEN": TOKEN}
    project.run_vdeploy("lock", env=env)
    outputs = [project.run_vdeploy("up", "--dry-run", env=env)]  # fetches with the token, then plans
    assert "HF_TOKEN=<redacted>" in outputs[0][1]
    assert_the_token_is_nowhere(project, outputs)
