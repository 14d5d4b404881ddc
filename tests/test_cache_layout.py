"""The store as a complete Hugging Face cache, and fetch's last gaps: refs/<revision> for sources
locked from a branch or tag, small files downloaded once, Ctrl-C that stops a fetch promptly and
leaves it resumable. Real huggingface_hub (and transformers, where installed) against the fake Hub.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

from vdeploy.lockfile import Lock, loads_lock

from needs import engine_module

MIB = 1024 * 1024
SLOW_LINK = 2 * MIB  # bytes per second: 16 Mbit/s


def read_lock(project) -> Lock:
    return loads_lock(project.lock.read_text(encoding="utf-8"))


def llama_config(hidden_size: int) -> bytes:
    return json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden_size}).encode()


def resolve_gets(hub, repo: str) -> Counter:
    """How many times each file of `repo` was asked for (GET .../resolve/<rev>/<path>)."""
    prefix = f"/{repo}/resolve/"
    return Counter(
        path[len(prefix):].split("/", 1)[1] for method, path in hub.requests if method == "GET" and path.startswith(prefix)
    )


def run_offline(project, script: str, *args: str) -> str:
    """Run a Python script with the Hub offline (as vLLM runs), in a fresh process; its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=project.env({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}),
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- refs: the locked snapshot found by its revision's name ---------------------------------------


def branch_and_tag_project(project, fake_hub, repo_id):
    """The model locked from tag v1.0, the tokenizer from branch main, which has moved on since."""
    tagged = fake_hub.commit(repo_id, {"config.json": llama_config(64), "model.safetensors": b"\1" * 4096})
    fake_hub.tag(repo_id, "v1.0", tagged)
    head = fake_hub.commit(repo_id, {"config.json": llama_config(128), "tokenizer.json": b'{"v": 2}\n'})
    project.write_manifest(
        f'[model]\nrepo = "{repo_id}"\nrevision = "v1.0"\n\n[tokenizer]\nrepo = "{repo_id}"\nrevision = "main"\n'
    )
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    # Upstream moves on: offline, the names must still find what the lock pins.
    fake_hub.commit(repo_id, {"config.json": llama_config(256)})
    return tagged, head


def test_fetch_writes_refs_so_huggingface_hub_offline_finds_the_locked_snapshots_by_name(project, fake_hub, repo_id):
    tagged, head = branch_and_tag_project(project, fake_hub, repo_id)
    repo_dir = project.store / ("models--" + repo_id.replace("/", "--"))
    assert (repo_dir / "refs" / "v1.0").read_text() == tagged
    assert (repo_dir / "refs" / "main").read_text() == head

    fake_hub.clear_requests()
    script = (
        "import json, sys\n"
        "from huggingface_hub import snapshot_download\n"
        "repo, store = sys.argv[1:3]\n"
        "print(json.dumps({rev: snapshot_download(repo, revision=rev, local_files_only=True, cache_dir=store)\n"
        "                  for rev in ('v1.0', 'main')}))\n"
    )
    found = json.loads(run_offline(project, script, repo_id, str(project.store)))
    assert found == {"v1.0": str(repo_dir / "snapshots" / tagged), "main": str(repo_dir / "snapshots" / head)}
    assert fake_hub.requests == []


def test_transformers_offline_loads_the_locked_config_by_revision_name(project, fake_hub, repo_id):
    engine_module("transformers")
    branch_and_tag_project(project, fake_hub, repo_id)
    fake_hub.clear_requests()
    script = (
        "import sys\n"
        "from transformers import AutoConfig\n"
        "repo, store = sys.argv[1:3]\n"
        "for rev in ('v1.0', 'main'):\n"
        "    config = AutoConfig.from_pretrained(repo, revision=rev, cache_dir=store, local_files_only=True)\n"
        "    print(rev, config.hidden_size)\n"
    )
    assert run_offline(project, script, repo_id, str(project.store)).split() == ["v1.0", "64", "main", "128"]
    assert fake_hub.requests == []


def test_a_source_locked_by_commit_writes_no_ref(project, fake_hub, repo_id):
    commit = fake_hub.commit(repo_id, {"config.json": llama_config(64)})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\nrevision = "{commit}"\n')
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    repo_dir = project.store / ("models--" + repo_id.replace("/", "--"))
    assert (repo_dir / "snapshots" / commit / "config.json").read_bytes() == llama_config(64)
    assert not (repo_dir / "refs").exists()


# ---- small files: read once by lock, never downloaded again ---------------------------------------


def test_lock_then_fetch_downloads_each_small_file_once_in_all(project, fake_hub, repo_id):
    small = {
        "config.json": llama_config(64),
        "generation_config.json": b'{"temperature": 0.6}\n',
        "tokenizer.json": b'{"vocab": {"a": 0}}\n',
        "tokenizer_config.json": b'{"bos_token": "<s>"}\n',
        "sub/dir/special_tokens_map.json": b"{}\n",
    }
    weights = b"\2" * 64 * 1024
    fake_hub.commit(repo_id, {**small, "model.safetensors": weights})
    fake_hub.clear_requests()
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    after_lock = resolve_gets(fake_hub, repo_id)
    _, _, err = project.run_vdeploy("fetch")

    assert after_lock == Counter(small.keys())  # lock reads the small files to hash them, not the weights
    assert resolve_gets(fake_hub, repo_id) == Counter([*small, "model.safetensors"])
    assert "1 downloaded" in err and f"{len(small)} already present" in err
    lock = read_lock(project)
    snapshot = project.store / lock.model.name / "snapshots" / lock.model.commit
    for path, data in {**small, "model.safetensors": weights}.items():
        assert (snapshot / path).read_bytes() == data, path
    project.run_vdeploy("verify", "--full")


# ---- Ctrl-C during fetch ----------------------------------------------------------------------


def test_ctrl_c_stops_a_slow_fetch_within_seconds_and_the_next_fetch_resumes(project, fake_hub, repo_id):
    weights = bytes(range(256)) * (16 * MIB // 256)
    fake_hub.commit(repo_id, {"config.json": llama_config(64), "model.safetensors": weights})
    project.write_manifest(f'[model]\nrepo = "{repo_id}"\n')
    project.run_vdeploy("lock")
    lock = read_lock(project)
    file = lock.model.file("model.safetensors")
    blob = project.store / lock.model.name / "blobs" / file.blob
    partial = blob.with_name(blob.name + ".incomplete")
    entry = project.store / lock.model.name / "snapshots" / lock.model.commit / "model.safetensors"

    # On a slow link the whole file would take 8 s; the stop must not wait for a big chunk to fill.
    fake_hub.throttle(repo_id, "model.safetensors", SLOW_LINK)
    fetching = subprocess.Popen(
        [sys.executable, "-m", "vdeploy", "fetch"], cwd=project.folder, env=project.env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert fetching.poll() is None, fetching.communicate()
            assert time.monotonic() < deadline, "no partial download appeared"
            time.sleep(0.01)
        fetching.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, err = fetching.communicate(timeout=30)
        stopped_after = time.monotonic() - interrupted
    finally:
        if fetching.poll() is None:
            fetching.kill()
            fetching.communicate()
    assert fetching.returncode == 130, err
    assert "Traceback" not in err
    assert stopped_after < 2.0, f"fetch took {stopped_after:.1f} s to stop after Ctrl-C"
    kept = partial.stat().st_size
    assert 0 < kept < len(weights) and partial.read_bytes() == weights[:kept]
    assert not entry.exists() and not entry.is_symlink() and not blob.exists()

    fake_hub.reset_faults()
    fake_hub.clear_requests()
    project.run_vdeploy("fetch")
    assert fake_hub.ranges_asked(repo_id, "model.safetensors") == [f"bytes={kept}-"]  # resumed, not restarted
    assert entry.read_bytes() == weights and not partial.exists()
    project.run_vdeploy("verify", "--full")
