"""`vdeploy check` on the real vLLM (CPU build), issue 12: golden answers recorded by a `check` that
starts and stops the deployment itself, then replayed against a fresh `up --detach` bit for bit;
a hand-edited golden file, batched answers, and a relocked seed each fail or report as they should.

Three launches in all: `check --record` (its own), one `up --detach` shared by the --url tests, and
the relocked deployment's `check` (its own).
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
from engine_support import assert_run_left_nothing, free_port, lock_and_fetch, run_records, tiny_manifest

from vdeploy.golden import GOLDEN_NAME

LAUNCH = 600
CHECKS = """
[[check]]
name = "greedy"
prompt = "Hello, my name is"

[[check]]
name = "sampled"
prompt = "The capital of"
temperature = 1.0
max-tokens = 12

[[check]]
name = "chat"
messages = [{ role = "user", content = "Hi there" }]
max-tokens = 8
"""


def manifest(repo: str, seed: int = 0) -> str:
    return tiny_manifest(repo, seed=seed) + CHECKS


@pytest.fixture(scope="module")
def recorded(make_project, tiny_repo):
    """The tiny model with three checks, recorded by `check --record` (which starts vLLM itself)."""
    project = make_project("check")
    project.write_manifest(manifest(tiny_repo))
    lock_and_fetch(project)
    _, out, err = project.run_vdeploy("check", "--record", "--no-fetch", timeout=LAUNCH)
    return project, out, err


@pytest.fixture(scope="module")
def live(recorded):
    """A fresh launch of the same lock, detached; stopped when the module ends."""
    project, _, _ = recorded
    port = free_port()
    project.run_vdeploy("up", "--detach", "--no-fetch", "--port", str(port), timeout=LAUNCH)
    yield f"http://127.0.0.1:{port}"
    project.run_vdeploy("down", expect=None)


def golden_of(project) -> dict:
    return json.loads((project.folder / GOLDEN_NAME).read_text())


def test_record_writes_canonical_golden_answers_and_stops_the_server_it_started(recorded):
    project, out, err = recorded
    lock = project.lock.read_text()
    deployment = re.search(r'^deployment = "([0-9a-f]{64})"', lock, re.MULTILINE).group(1)
    records = run_records(project)
    assert [r["kind"] for r in records] == ["check"]
    record = records[0]
    hardware = record["hardware"]["class"]
    assert f"recorded 3 check(s) for deployment {deployment[:16]} on {hardware}" in out
    assert record["exit_code"] == 0 and record["stopped_by"] == "check" and record["deployment"] == deployment
    assert_run_left_nothing(project, record)
    text = (project.folder / GOLDEN_NAME).read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    entry = data["deployments"][deployment]
    assert entry["lock"]["deployment"] == deployment  # the lock it was recorded from, for a later diff
    checks = entry["hardware"][hardware]["checks"]
    assert sorted(checks) == ["chat", "greedy", "sampled"]
    for name, check in checks.items():
        assert check["request"]["seed"] == 0 and check["request"]["return_token_ids"] is True
        assert len(check["tokens"]) == len(check["logprobs"]) == len(check["token_texts"]) > 0, name
        assert all(isinstance(t, int) for t in check["tokens"]) and all(p <= 0 for p in check["logprobs"])
    assert len(checks["greedy"]["tokens"]) == 16 and checks["chat"]["request"]["endpoint"] == "/v1/chat/completions"


def test_a_fresh_launch_answers_every_check_bit_for_bit(recorded, live):
    project, _, _ = recorded
    _, out, _ = project.run_vdeploy("check", "--url", live, timeout=LAUNCH)
    assert out.splitlines() == ["same     greedy", "same     sampled", "same     chat",
                                "ok: 3 check(s) answer as recorded"]


def test_a_golden_file_edited_by_hand_fails_naming_that_check(recorded, live):
    project, _, _ = recorded
    path = project.folder / GOLDEN_NAME
    original = path.read_text()
    data = json.loads(original)
    (entry,) = data["deployments"].values()
    (checks,) = (c["checks"] for c in entry["hardware"].values())
    checks["sampled"]["logprobs"][3] += 1e-6
    path.write_text(json.dumps(data))
    try:
        _, out, _ = project.run_vdeploy("check", "--url", live, expect=1, timeout=LAUNCH)
        lines = out.splitlines()
        assert "same     greedy" in lines and "same     chat" in lines
        drifted = [line for line in lines if line.startswith("drifted  sampled")]
        assert len(drifted) == 1 and "tokens identical; largest logprob difference 1e-06" in drifted[0]
        assert lines[-1] == "FAILED: sampled does not answer as recorded"
        # within a tolerance that covers the edit, it passes
        project.run_vdeploy("check", "--url", live, "--tolerance", "1e-5", timeout=LAUNCH)
    finally:
        path.write_text(original)


def test_concurrency_4_reports_the_largest_difference_between_lone_and_batched_answers(recorded, live):
    project, _, _ = recorded
    _, out, _ = project.run_vdeploy("check", "--url", live, "--concurrency", "4", "--json", timeout=LAUNCH)
    report = json.loads(out)
    load = report["load"]
    assert load["concurrency"] == 4 and load["answers"] == 6  # 3 checks twice: 4 in flight at once
    assert isinstance(load["largest_difference"], float) and load["largest_difference"] >= 0
    assert report["ok"]  # the lone answers decide; the batched ones are measured
    _, text, _ = project.run_vdeploy("check", "--url", live, "--concurrency", "4", timeout=LAUNCH)
    assert re.search(r"under load \(6 answers, 4 at a time\): largest logprob difference from the lone answers "
                     r"[0-9.e+-]+; tokens (identical|changed for .+)", text), text
    print(f"float32, tiny model, --concurrency 4: largest logprob difference {load['largest_difference']!r}")


def test_a_relocked_seed_fails_naming_the_drifted_check_its_first_token_and_the_other_deployment(
    recorded, live, make_project, tiny_repo,
):
    project, _, _ = recorded
    project.run_vdeploy("down", timeout=120)  # one engine at a time on this machine
    other = make_project("check-seed")
    other.write_manifest(manifest(tiny_repo, seed=1))
    lock_and_fetch(other)
    shutil.copyfile(project.folder / GOLDEN_NAME, other.folder / GOLDEN_NAME)
    recorded_id = next(iter(golden_of(project)["deployments"]))
    _, out, _ = other.run_vdeploy("check", "--no-fetch", expect=1, timeout=LAUNCH)
    lines = out.splitlines()
    new_id = re.search(r'^deployment = "([0-9a-f]{64})"', other.lock.read_text(), re.MULTILINE).group(1)
    assert lines[0] == (f"deployment {new_id[:16]} is not a recorded one (recorded: {recorded_id[:16]}); "
                        f"compared with {recorded_id[:16]}, which differs from it in:")
    assert "  seed: changes outputs" in lines and "    seed changed: 0 → 1" in lines
    # greedy answers do not depend on the seed; the sampled one does, from some token on
    assert "same     greedy" in lines and "same     chat" in lines
    drifted = [line for line in lines if line.startswith("drifted  sampled: from token ")]
    assert len(drifted) == 1 and ": golden '" in drifted[0] and ", now '" in drifted[0], out
    assert lines[-1] == (f"FAILED: sampled does not answer as recorded; and deployment {new_id[:16]} "
                         "has no golden answers of its own")
    (record,) = run_records(other)
    assert record["kind"] == "check" and record["exit_code"] == 0
    assert_run_left_nothing(other, record)
