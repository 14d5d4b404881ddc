"""Multi-node `plan --node-rank` and `up --node-rank`: every node runs the same lock, and only the
topology flags differ, as the engine's own parser reads them. (A headless node's launch and tensor
parallel 2 for real: tests/e2e/test_nodes_served.py.)"""

from __future__ import annotations

import json
import sys

import pytest

from needs import needs_engine
from test_bundle import commit_repos, error_line

MANIFEST = """[model]
repo = "{model}"

[serve]
tensor-parallel-size = 2
nnodes = 2
master-port = 29501
max-model-len = 256

[runtime]
seed = 0
"""


@pytest.fixture(scope="module")
def two_node(make_project, fake_hub):
    """A project whose lock spreads one model over two nodes (no master-addr: it is given at `up`)."""
    model, _ = commit_repos(fake_hub, "test/two-node-model")
    project = make_project("two-node")
    project.write_manifest(MANIFEST.format(model=model))
    project.run_vdeploy("lock", timeout=300)
    return project


def test_plan_node_rank_shows_only_how_the_node_differs_from_node_0(two_node):
    lock = two_node.lock.read_bytes()
    _, out, _ = two_node.run_vdeploy("plan", "--node-rank", "1", "--master-addr", "10.0.0.1")
    header, *lines = out.splitlines()
    assert header.startswith("# node 1 of 2 against node 0 (deployment ")
    assert lines == [
        "  headless added",
        "  node-rank changed: 0 → 1",
        "  waits for changed: /health answers 200 → its engine joined node 0",
    ]
    _, out, _ = two_node.run_vdeploy("plan", "--node-rank", "1", "--master-addr", "10.0.0.1", "--json")
    shown = json.loads(out)
    assert [(c["group"], c["what"], c["old"], c["new"]) for c in shown["changes"]] == [
        ("argv", "headless", None, True), ("argv", "node-rank", "0", "1"),
        ("node", "waits for", "/health answers 200", "its engine joined node 0"),
    ]
    assert all(not c["changes_outputs"] for c in shown["changes"])
    _, out, _ = two_node.run_vdeploy("plan", "--node-rank", "0", "--master-addr", "10.0.0.1")
    assert out.splitlines()[1:] == ["  no difference"]
    # Runtime-only: the lock, and so the deployment id, is the same whichever node asks.
    assert two_node.lock.read_bytes() == lock
    assert json.loads(two_node.run_vdeploy("plan", "--json")[1])["deployment"] == shown["deployment"]


@pytest.mark.parametrize("args,message", [
    (["--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank 2 is outside 0..1 (nnodes = 2)"),
    (["--node-rank", "1"], "--master-addr is needed"),
    (["--node-rank", "1", "--master-addr", "--evil"], "--master-addr '--evil' is not"),
    (["--node-rank", "-1", "--master-addr", "h"], "--node-rank -1 is outside"),
])
def test_a_node_that_cannot_be_is_refused_in_one_line(two_node, args, message):
    code, _, err = two_node.run_vdeploy("plan", *args, expect=None)
    assert code in (1, 2)
    assert message in error_line(err)


@needs_engine  # without one, `up` stops before the store: no engine to launch
def test_up_dry_run_for_a_node_verifies_its_store_first(two_node):
    _, _, err = two_node.run_vdeploy("up", "--dry-run", "--no-fetch", "--node-rank", "1", "--master-addr", "10.0.0.1", expect=1)
    assert "does not match the lock" in error_line(err)


@needs_engine
def test_the_engines_parser_reads_each_nodes_argv_as_that_node(two_node, monkeypatch, tmp_path):
    from vdeploy.plan import without_topology
    from vdeploy.prepare import Options, prepare
    from vdeploy.probe import parse_engine_argvs

    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(two_node.cache))
    monkeypatch.setenv("HF_HOME", str(two_node.home))
    plans = [prepare(two_node.manifest, Options(node_rank=rank, master_addr="10.0.0.1"), {}, lambda _: None).plan
             for rank in (0, 1)]
    assert plans[0].deployment == plans[1].deployment
    assert without_topology(plans[0].argv) == without_topology(plans[1].argv)
    launcher = 3 if plans[0].argv[1] == "-m" else 2
    head, worker = parse_engine_argvs(sys.executable, [list(p.argv[launcher:]) for p in plans])
    assert (head["nnodes"], head["node_rank"], head["master_addr"], head["master_port"], head["headless"]) == (2, 0, "10.0.0.1", 29501, False)
    assert (worker["nnodes"], worker["node_rank"], worker["master_addr"], worker["master_port"], worker["headless"]) == (2, 1, "10.0.0.1", 29501, True)
    assert worker["tensor_parallel_size"] == head["tensor_parallel_size"] == 2
    assert {k: v for k, v in head.items() if k not in ("node_rank", "headless")} == \
        {k: v for k, v in worker.items() if k not in ("node_rank", "headless")}
