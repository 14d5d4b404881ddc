"""A deployment that outlives its sources: lock → fetch → bundle → unbundle into an empty store on
"another machine" (no Hub) → `up --no-fetch` answers exactly as the original did.

One launch: the original's answers come from test_up's first launch of the same lock when it ran
earlier in the session (it does in a full run); alone, this test launches the original itself.
"""

from __future__ import annotations

from engine_support import complete_three, start_up, tiny_manifest
from store_tree import tree

from vdeploy.lockfile import loads_lock

NO_HUB = "http://127.0.0.1:9"  # nothing listens there: any request to the Hub fails


def test_up_serves_a_store_restored_from_a_bundle_with_no_hub_answering_as_the_original(
    project, make_project, tiny_repo, answers_of_fresh_launches, tmp_path,
):
    project.write_manifest(tiny_manifest(tiny_repo))
    project.run_vdeploy("lock", timeout=300)
    project.run_vdeploy("fetch")
    deployment = loads_lock(project.lock.read_text()).deployment
    _, digest, _ = project.run_vdeploy("bundle", "--tar", "-o", tmp_path / "tiny.tar")

    restored = make_project("restored")
    restored.write_manifest(tiny_manifest(tiny_repo))
    _, _, err = restored.run_vdeploy("unbundle", tmp_path / "tiny.tar", env={"HF_ENDPOINT": NO_HUB})
    assert f"restored {digest.strip()}" in err
    assert restored.lock.read_bytes() == project.lock.read_bytes()
    assert tree(restored.store) == tree(project.store)

    original = answers_of_fresh_launches.get(deployment)
    if original is None:
        first = start_up(project, "--no-fetch")
        try:
            original = complete_three(first.url, deployment)
        finally:
            first.stop()

    running = start_up(restored, "--no-fetch", env={"HF_ENDPOINT": NO_HUB})
    try:
        assert complete_three(running.url, deployment) == original
    finally:
        assert running.stop() in (0, 143), running.output()[-3000:]
