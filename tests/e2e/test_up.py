"""`vdeploy up` against the real vLLM (CPU build): lock → fetch → up → answers → stop → up again."""

from __future__ import annotations

import json
import signal

from engine_support import call, complete_three, processes_in_group, processes_mentioning, start_up, tiny_manifest

from vdeploy.lockfile import loads_lock


def last_run(project) -> dict:
    records = sorted((project.folder / ".vdeploy" / "runs").glob("*/record.json"))
    return json.loads(records[-1].read_text())


def assert_nothing_left(project, run: dict) -> None:
    assert processes_in_group(run["pid"]) == [], "vLLM processes outlived `vdeploy up`"
    assert processes_mentioning(str(project.store)) == [], "a process still runs from the store"


def test_two_launches_from_one_lock_answer_the_same_and_a_new_seed_differs(project, tiny_repo, answers_of_fresh_launches):
    project.write_manifest(tiny_manifest(tiny_repo))
    project.run_vdeploy("lock")
    project.run_vdeploy("fetch")
    lock = loads_lock(project.lock.read_text())

    # At DEBUG, where vLLM would log prompt text if [serve] had enable-log-requests
    first = start_up(project, "--no-fetch", env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    try:
        status, models, _ = call(first.url, "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
        answers = complete_three(first.url, lock.deployment)
        answers_of_fresh_launches[lock.deployment] = answers  # test_up_from_bundle compares with them
    finally:
        code = first.stop()
    assert "The capital of" not in first.output()  # no enable-log-requests: no prompt in the log
    run = last_run(project)
    # stopped by SIGTERM: 128 + 15, whatever vLLM itself returned
    assert code == run["exit_code"] == 143, first.output()[-3000:]
    assert run["deployment"] == lock.deployment
    assert run["ready"] and run["stopped"] and run["stopped_by"] == "SIGTERM"
    assert "--seed" in run["argv"] and run["argv"][run["argv"].index("--seed") + 1] == "0"
    assert run["env"]["HF_HUB_OFFLINE"] == "1"
    # the caller's unpinned variable was passed on, and recorded as such
    assert run["env"]["VLLM_LOGGING_LEVEL"] == "DEBUG" and run["inherited"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert " DEBUG " in first.output()
    assert_nothing_left(project, run)

    # --pure: the same unpinned variable is recorded but not passed on
    again = start_up(project, "--no-fetch", "--pure", env={"VLLM_LOGGING_LEVEL": "DEBUG"})
    try:
        assert complete_three(again.url, lock.deployment) == answers
    finally:
        # Ctrl-C, as a person would stop it
        assert again.stop(signal.SIGINT) == 130, again.output()[-3000:]
    pure_run = last_run(project)
    assert pure_run["exit_code"] == 130 and pure_run["stopped_by"] == "SIGINT"
    assert pure_run["pure"] and "VLLM_LOGGING_LEVEL" not in pure_run["env"]
    assert pure_run["inherited"]["VLLM_LOGGING_LEVEL"] == "DEBUG"
    assert " DEBUG " not in again.output()
    assert_nothing_left(project, pure_run)

    _, listing, _ = project.run_vdeploy("runs")
    assert listing.count(lock.deployment[:16]) == 2

    project.write_manifest(tiny_manifest(tiny_repo, seed=7))
    project.run_vdeploy("lock")
    reseeded = loads_lock(project.lock.read_text())
    assert reseeded.deployment != lock.deployment
    other = start_up(project, "--no-fetch")
    try:
        assert complete_three(other.url, reseeded.deployment) != answers
    finally:
        other.stop()
    assert_nothing_left(project, last_run(project))
