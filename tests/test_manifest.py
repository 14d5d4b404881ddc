"""Bad manifests: each mistake is one line naming the file, the key and its line, and exit code 1.

The CLI runs in a subprocess, as a user runs it; none of these cases reaches the network.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from manifests import pin_engine

from vdeploy.errors import ManifestError
from vdeploy.manifest import find_manifest, load_manifest

GOOD_MODEL = '[model]\nrepo = "org/name"\n'

# (id, manifest text, key the message must name, its line, words the message must hold)
BAD_MANIFESTS = [
    (
        "unknown-table",
        GOOD_MODEL + '\n[modle]\nrepo = "x/y"\n',
        "[modle]", 4, ["unknown table", "did you mean 'model'"],
    ),
    (
        "unknown-key",
        '[model]\nrepo = "org/name"\nrevison = "main"\n',
        "revison", 3, ["unknown key", "did you mean 'revision'"],
    ),
    (
        "unknown-key-far-from-any",
        GOOD_MODEL + '[runtime]\nseed = 1\nzzzzzz = 2\n',
        "zzzzzz", 5, ["unknown key", "known: deterministic, engine, engine-environment, engine-image, env, seed"],
    ),
    (
        "unknown-policy-key",
        GOOD_MODEL + '[policy]\ntrust_remote_code = false\n',
        "trust_remote_code", 4, ["did you mean 'trust-remote-code'"],
    ),
    (
        "wrong-type-revision",
        '[model]\nrepo = "org/name"\nrevision = 5\n',
        "revision", 3, ["must be a string"],
    ),
    (
        "wrong-type-seed",
        GOOD_MODEL + '[runtime]\nseed = "zero"\n',
        "seed", 4, ["non-negative integer"],
    ),
    (
        "wrong-type-bool-seed",
        GOOD_MODEL + '[runtime]\nseed = true\n',
        "seed", 4, ["non-negative integer"],
    ),
    (
        "wrong-type-include",
        '[model]\nrepo = "org/name"\ninclude = "*.json"\n',
        "include", 3, ["list of glob patterns"],
    ),
    (
        "wrong-type-env-value",
        GOOD_MODEL + '[runtime]\nenv = { OMP_NUM_THREADS = 8 }\n',
        "env", 4, ["OMP_NUM_THREADS must be a string"],
    ),
    (
        "wrong-type-trust-remote-code",
        GOOD_MODEL + '[policy]\ntrust-remote-code = 0\n',
        "trust-remote-code", 4, ['must be false or "pinned"'],
    ),
    (
        "table-given-as-value",
        'model = "org/name"\n',
        "model", 1, ["must be a table"],
    ),
    (
        "repo-with-double-dash",
        '[model]\nrepo = "org/na--me"\n',
        "repo", 2, ["not a Hub repo id"],
    ),
    (
        "repo-and-path",
        '[model]\nrepo = "org/name"\npath = "./ckpt"\n',
        "path", 3, ["both repo and path"],
    ),
    (
        "neither-repo-nor-path",
        '[model]\nrevision = "main"\n',
        "[model]", 1, ["needs repo"],
    ),
    (
        "malformed-revision",
        '[model]\nrepo = "org/name"\nrevision = "v1..2"\n',
        "revision", 3, ["not a branch, tag or 40-hex commit"],
    ),
    (
        "uppercase-commit",
        '[model]\nrepo = "org/name"\nrevision = "' + "ABCDEF0123" * 4 + '"\n',
        "revision", 3, ["lowercase"],
    ),
    (
        "abbreviated-commit",
        '[model]\nrepo = "org/name"\nrevision = "abc1234"\n',
        "revision", 3, ["abbreviated"],
    ),
    (
        "tokenizer-malformed-revision",
        GOOD_MODEL + '[tokenizer]\nrepo = "org/tok"\nrevision = "a b"\n',
        "revision", 5, ["[tokenizer]"],
    ),
    (
        "missing-chat-template-file",
        GOOD_MODEL + '\n[chat-template]\nfile = "templates/nope.jinja"\n',
        "file", 5, ["templates/nope.jinja does not exist"],
    ),
    (
        "owned-flag-in-serve",
        GOOD_MODEL + '[serve]\nmax-model-len = 2048\nseed = 3\n',
        "seed", 5, ["set by vdeploy", "[runtime] seed"],
    ),
    (
        "owned-flag-in-serve-underscored",
        GOOD_MODEL + '[serve]\ntokenizer_revision = "main"\n',
        "tokenizer_revision", 4, ["set by vdeploy"],
    ),
    (
        "inline-api-key",
        GOOD_MODEL + '[serve]\nport = 8000\napi-key = "sk-very-secret-123"\n',
        "api-key", 5, ["secret", 'env = "VLLM_API_KEY"'],
    ),
]


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def bad_manifest_runs(make_project):
    """`vdeploy lock` on every bad manifest, a few at a time (each run is mostly interpreter start-up)."""

    def run(case):
        project = make_project(case[0])
        manifest = project.write_manifest(case[1])
        return case[0], (project, manifest, *project.run_vdeploy("lock", expect=None))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(pool.map(run, BAD_MANIFESTS))


@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=[case[0] for case in BAD_MANIFESTS])
def test_bad_manifest_is_one_line_naming_file_key_and_line(bad_manifest_runs, case):
    name, text, key, line, words = case
    project, manifest, code, stdout, stderr = bad_manifest_runs[name]
    assert code == 1, stderr
    assert "Traceback" not in stderr + stdout
    message = _one_line(stderr)
    assert f"{manifest}:{line}:" in message
    assert key in message
    for word in words:
        assert word in message
    assert "sk-very-secret" not in stderr + stdout
    assert not project.lock.exists()
    assert not project.store.exists()  # validation is offline: nothing was fetched or created


@pytest.mark.parametrize("command", ["fetch", "verify"])
def test_every_command_validates_the_manifest_the_same_way(project, command):
    manifest = project.write_manifest('[model]\nrepo = "org/name"\nrevison = "main"\n')
    code, stdout, stderr = project.run_vdeploy(command, expect=1)
    message = _one_line(stderr)
    assert f"{manifest}:3:" in message and "did you mean 'revision'" in message


def test_invalid_toml_is_one_line_with_its_position(project):
    manifest = project.write_manifest('[model]\nrepo = "org/name\n')
    code, stdout, stderr = project.run_vdeploy("lock", expect=1)
    message = _one_line(stderr)
    assert str(manifest) in message and "line 2" in message
    assert "Traceback" not in stderr


def test_no_manifest_is_one_line(project):
    code, stdout, stderr = project.run_vdeploy("lock", expect=1)
    message = _one_line(stderr)
    assert "vdeploy.toml" in message and "no manifest" in message


# ---- the manifest argument: a file, a folder, or ./vdeploy.toml -----------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_default_is_vdeploy_toml_in_the_current_folder(tmp_path, monkeypatch):
    manifest = _write(tmp_path / "vdeploy.toml", GOOD_MODEL)
    monkeypatch.chdir(tmp_path)
    assert find_manifest(None) == manifest.resolve()
    assert load_manifest().lock_path == tmp_path.resolve() / "vdeploy.lock"


def test_a_folder_means_its_vdeploy_toml(tmp_path):
    manifest = _write(tmp_path / "deploy" / "vdeploy.toml", GOOD_MODEL)
    assert find_manifest(tmp_path / "deploy") == manifest.resolve()


def test_a_file_of_another_name_is_used_as_given(tmp_path):
    manifest = _write(tmp_path / "staging.toml", GOOD_MODEL)
    loaded = load_manifest(manifest)
    assert loaded.path == manifest.resolve()
    assert loaded.lock_path == tmp_path.resolve() / "vdeploy.lock"


def test_a_folder_without_a_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        find_manifest(tmp_path)


def test_relative_paths_resolve_against_the_manifest_folder_not_the_cwd(tmp_path, monkeypatch):
    _write(tmp_path / "deploy" / "templates" / "chat.jinja", "{{ messages }}")
    manifest = _write(
        tmp_path / "deploy" / "vdeploy.toml",
        '[model]\npath = "./ckpt"\n[chat-template]\nfile = "templates/chat.jinja"\n[store]\ndownload-dir = "models"\n',
    )
    monkeypatch.chdir(tmp_path)
    loaded = load_manifest(manifest.parent)
    assert loaded.model.path == (tmp_path / "deploy" / "ckpt").resolve()
    assert loaded.chat_template.file == (tmp_path / "deploy" / "templates" / "chat.jinja").resolve()
    assert loaded.store_path() == (tmp_path / "deploy" / "models").resolve()


def test_cli_accepts_a_folder_and_writes_the_lock_beside_the_manifest(project, tmp_path):
    """A folder argument from elsewhere: the lock lands next to its manifest, not in the cwd."""
    deploy = tmp_path / "elsewhere"
    _write(deploy / "ckpt" / "config.json", '{"a": 1}')
    _write(deploy / "vdeploy.toml", pin_engine('[model]\npath = "ckpt"\n[store]\ndownload-dir = "models"\n'))
    code, stdout, stderr = project.run_vdeploy("lock", deploy)
    assert (deploy / "vdeploy.lock").is_file()
    assert not project.lock.exists()
    project.run_vdeploy("verify", deploy / "vdeploy.toml")


def test_cli_default_manifest_is_in_the_current_folder(project):
    (project.folder / "ckpt").mkdir()
    (project.folder / "ckpt" / "config.json").write_text("{}")
    project.write_manifest('[model]\npath = "ckpt"\n[store]\ndownload-dir = "models"\n')
    code, stdout, stderr = project.run_vdeploy("lock")
    assert project.lock.is_file()
    assert re.search(r"wrote .*vdeploy\.lock \(1 files", stderr)


def test_good_manifest_round_trips_every_table(tmp_path):
    _write(tmp_path / "chat.jinja", "{{ bos_token }}")
    manifest = _write(
        tmp_path / "vdeploy.toml",
        """
[model]
repo = "Qwen/Qwen3-0.6B"
revision = "main"
include = ["*.json", "*.safetensors"]

[tokenizer]
repo = "Qwen/Qwen3-0.6B"
revision = "v1.0"

[chat-template]
file = "chat.jinja"

[serve]
served-model-name = "qwen3"
max_model_len = "32K"
api-key = { env = "VLLM_API_KEY" }

[runtime]
seed = 7
env = { OMP_NUM_THREADS = "8" }

[policy]
trust-remote-code = "pinned"

[store]
download-dir = "models"
""",
    )
    loaded = load_manifest(manifest)
    assert loaded.model.repo == "Qwen/Qwen3-0.6B" and loaded.model.include == ("*.json", "*.safetensors")
    assert loaded.tokenizer.revision == "v1.0"
    assert loaded.serve == {
        "api-key": {"env": "VLLM_API_KEY"}, "max-model-len": "32K", "served-model-name": "qwen3",
    }
    assert loaded.seed == 7 and loaded.env == {"OMP_NUM_THREADS": "8"}
    assert loaded.policy.trust_remote_code == "pinned"
