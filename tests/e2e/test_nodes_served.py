"""Issue 15 for real, with two engine launches:

- a tensor-parallel-2 deployment pushed to a real registry, pulled into an empty store on another
  path with no Hub, checked by `verify --full`, and served by `up --no-fetch` (two CPU workers,
  bound one per core with VLLM_CPU_OMP_THREADS_BIND); its log shows the line a headless node's
  `up` waits for, so the join signal is one real vLLM prints;
- a headless node (`up --node-rank 1`) of a two-node deployment whose node 0 never comes: it is
  not waited on for /health and never checks the HTTP port; it ends when it has not joined in time,
  and its run record names its rank and hardware class. (The CPU build cannot run two nodes: see
  ../shared/notes/vllm.md.)
"""

from __future__ import annotations

import json
import socket

import pytest

from engine_support import call, free_port, run_records, start_up, tiny_manifest
from registry_server import RegistryServer, registry_binary
from store_tree import tree

from vdeploy.enginelog import has_joined
from vdeploy.lockfile import loads_lock

NO_HUB = "http://127.0.0.1:9"  # nothing listens there: any request to the Hub fails
TP2 = 'tensor-parallel-size = 2\n'
BIND_TWO_CORES = 'env = { VLLM_CPU_KVCACHE_SPACE = "1", VLLM_CPU_OMP_THREADS_BIND = "0|1" }'


def two_core_manifest(repo: str, serve: str) -> str:
    return tiny_manifest(repo, serve=serve).replace('env = { VLLM_CPU_KVCACHE_SPACE = "1" }', BIND_TWO_CORES)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    if registry_binary() is None:
        pytest.skip("docker-registry is not installed (apt-get install docker-registry; .ci/run installs it)")
    server = RegistryServer(tmp_path_factory.mktemp("registry")).__enter__()
    yield server
    server.stop()


def test_a_pulled_tensor_parallel_2_deployment_serves_with_no_hub(project, make_project, tiny_repo, registry):
    project.write_manifest(two_core_manifest(tiny_repo, TP2))
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")
    deployment = loads_lock(project.lock.read_text()).deployment
    _, reference, _ = project.run_vdeploy("push", f"{registry.host}/e2e/tiny-tp2:v1", timeout=120)
    reference = reference.strip()

    node = make_project("pulled")
    node.write_manifest(two_core_manifest(tiny_repo, TP2))
    no_hub = {"HF_ENDPOINT": NO_HUB}
    _, printed, _ = node.run_vdeploy("pull", f"{registry.host}/e2e/tiny-tp2:v1", env=no_hub, timeout=120)
    assert printed.strip() == reference
    assert node.lock.read_bytes() == project.lock.read_bytes()
    assert tree(node.store) == tree(project.store) and node.store != project.store
    node.run_vdeploy("verify", "--full", env=no_hub)

    running = start_up(node, "--no-fetch", env=no_hub)
    try:
        status, body, _ = call(running.url, "/v1/completions", {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert status == 200, body
        assert body["system_fingerprint"] == deployment
    finally:
        assert running.stop() in (0, 143), running.output()[-3000:]
    [record] = run_records(node)
    assert record["effective"]["tensor_parallel_size"] == 2
    assert record["node"] is None
    with open(node.folder / ".vdeploy" / "runs" / record["run_id"] / "engine.log", errors="replace") as log:
        assert has_joined(log.read())


def test_a_headless_node_waits_to_join_not_for_health_and_its_record_names_its_rank(project, tiny_repo):
    master_port = free_port()
    project.write_manifest(tiny_manifest(tiny_repo, serve=f"nnodes = 2\nmaster-port = {master_port}\n"))
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")
    deployment = loads_lock(project.lock.read_text()).deployment
    port = free_port()
    # Something else holds the HTTP port: a headless node listens on none, so this is no refusal.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        code, _, err = project.run_vdeploy(
            "up", "--port", str(port), "--node-rank", "1", "--master-addr", "127.0.0.1", "--timeout", "25",
            expect=None, timeout=180,
        )
    assert code != 0, err
    assert "is taken" not in err and "/health" not in err, err
    [record] = run_records(project)
    assert record["node"] == {"rank": 1, "nodes": 2, "master_addr": "127.0.0.1", "master_port": master_port, "headless": True}
    assert record["hardware"]["class"]
    assert record["deployment"] == deployment
    assert "--headless" in record["argv"] and record["ready"] is None
    assert record["stopped_by"] in ("timeout", "engine"), json.dumps(record)[:2000]
    if record["stopped_by"] == "timeout":
        assert "join" in record["reason"]
