"""Step 7 of the flow: `vdeploy check`: ask the server the manifest's [[check]] prompts and compare
the answers with the golden ones (or record them with --record).

The server is either started here and stopped afterwards (launch.serve_during, the machinery of
`run`), or a live one named by --url. Requests go over the stdlib's urllib, each with an explicit
seed and `return_token_ids`, so an answer depends on neither order nor company, and carries its
token ids. The comparison and the golden file are golden.py's.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdeploy.errors import CheckError
from vdeploy.golden import (
    GOLDEN_NAME,
    Answer,
    Golden,
    LoadReport,
    Recorded,
    Verdict,
    compare_answer,
    load_report,
    read_golden,
    write_golden,
)
from vdeploy.lockfile import Lock
from vdeploy.manifest import CheckSpec, Manifest

if TYPE_CHECKING:
    from vdeploy.plan import Plan
    from vdeploy.prepare import Prepared

REQUEST_TIMEOUT = 300  # seconds for one answer; a loaded CPU is slow, not dead
DEPLOYMENT_RE = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CheckOptions:
    url: str | None = None  # a live server; None: start the deployment here
    record: bool = False
    tolerance: float = 0.0
    concurrency: int = 1
    pure: bool = False
    fetch: bool = True
    allow_engine_drift: bool = False
    timeout: float = 900  # for /health, when started here


@dataclass(frozen=True)
class Against:
    """Which golden entry this run was compared with, and why it may not be this deployment's own."""

    deployment: str | None  # None: nothing recorded at all
    hardware: str | None
    own: bool  # the recorded deployment id is this lock's
    recorded: tuple[str, ...] = ()  # every recorded deployment id
    recorded_classes: tuple[str, ...] = ()  # the classes recorded for `deployment`
    lock_changes: tuple[str, ...] = ()  # diff's report of the recorded lock against this one


@dataclass(frozen=True)
class CheckReport:
    """What `vdeploy check` found; `.ok` decides the exit code."""

    golden_path: Path
    deployment: str
    hardware: str
    url: str
    recorded: bool  # --record: the golden file was written
    verdicts: tuple[Verdict, ...] = ()
    against: Against | None = None
    load: LoadReport | None = None
    run: str | None = None  # the run record, when the server was started here

    @property
    def ok(self) -> bool:
        if self.recorded:
            return True
        return self.against is not None and self.against.own and all(v.same for v in self.verdicts)

    def failing(self) -> list[str]:
        return [v.name for v in self.verdicts if not v.same]

    def to_json(self) -> dict[str, Any]:
        against = self.against
        return {
            "golden": str(self.golden_path), "deployment": self.deployment, "hardware": self.hardware,
            "url": self.url, "recorded": self.recorded, "ok": self.ok, "run": self.run,
            "checks": [v.to_json() for v in self.verdicts],
            "against": None if against is None else {
                "deployment": against.deployment, "hardware": against.hardware, "own": against.own,
                "recorded": list(against.recorded), "recorded_classes": list(against.recorded_classes),
                "lock_changes": list(against.lock_changes),
            },
            "load": None if self.load is None else self.load.to_json(),
        }

    def render(self) -> list[str]:
        """The report a person reads; the verdict line last."""
        if self.recorded:
            lines = [f"recorded {len(self.verdicts)} check(s) for deployment {self.deployment[:16]} on {self.hardware} "
                     f"in {self.golden_path}"]
            return lines + ([self.load.describe()] if self.load else [])
        lines = self._against_lines()
        lines += [v.describe() for v in self.verdicts]
        if self.load is not None:
            lines.append(self.load.describe())
        failing = self.failing()
        if self.ok:
            lines.append(f"ok: {len(self.verdicts)} check(s) answer as recorded")
        elif failing:
            lines.append(f"FAILED: {', '.join(failing)} {'does' if len(failing) == 1 else 'do'} not answer as recorded"
                         + ("" if self.against is None or self.against.own else
                            f"; and deployment {self.deployment[:16]} has no golden answers of its own"))
        else:
            lines.append(f"FAILED: deployment {self.deployment[:16]} has no golden answers of its own; "
                         "record them with `vdeploy check --record` once its answers are trusted")
        return lines

    def _against_lines(self) -> list[str]:
        against = self.against
        if against is None or against.deployment is None:
            return []
        lines = []
        if not against.own:
            recorded = ", ".join(d[:16] for d in against.recorded)
            lines.append(f"deployment {self.deployment[:16]} is not a recorded one (recorded: {recorded}); "
                         f"compared with {against.deployment[:16]}, which differs from it in:")
            lines += [f"  {line}" for line in against.lock_changes] or ["  (its lock is not in the golden file)"]
        if against.hardware != self.hardware:
            lines.append(f"recorded on hardware class {', '.join(against.recorded_classes)}, this is {self.hardware}: "
                         "answers may differ by hardware; compared anyway")
        return lines


# ---- the requests --------------------------------------------------------------------------


def request_body(spec: CheckSpec, seed: int) -> dict[str, Any]:
    """The request a check sends (without the model name: that is operational)."""
    body: dict[str, Any] = {"max_tokens": spec.max_tokens, "temperature": spec.temperature,
                            "seed": spec.seed if spec.seed is not None else seed, "return_token_ids": True}
    if spec.prompt is not None:
        body.update(prompt=spec.prompt, logprobs=spec.logprobs)
    else:
        body.update(messages=[{"role": r, "content": c} for r, c in spec.messages or ()],
                    logprobs=True, top_logprobs=spec.logprobs)
    return body


def recorded_request(spec: CheckSpec, seed: int) -> dict[str, Any]:
    """The request as the golden file keeps it: where it went, and what it said."""
    return {"endpoint": spec.endpoint, **request_body(spec, seed)}


def parse_answer(name: str, body: Mapping[str, Any], chat: bool) -> tuple[Answer, str | None]:
    """The answer in one response, and the response's system_fingerprint."""
    try:
        choice = body["choices"][0]
        tokens = choice["token_ids"]
        if tokens is None:
            raise CheckError(f"check {name}: the server returned no token ids; it needs vLLM 0.10 or later (return_token_ids)")
        if chat:
            content = choice["logprobs"]["content"]
            text = choice["message"]["content"] or ""
            texts, logprobs = [c["token"] for c in content], [c["logprob"] for c in content]
        else:
            text = choice["text"]
            texts, logprobs = choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]
        answer = Answer(text, tuple(int(t) for t in tokens), tuple(str(t) for t in texts),
                        tuple(float(p) for p in logprobs))
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CheckError(f"check {name}: the server's answer lacks {exc} (choices, token_ids, logprobs)") from None
    return answer, body.get("system_fingerprint")


class Asker:
    """Sends checks to one server: URL, served model name, API key."""

    def __init__(self, url: str, model: str, api_key: str | None, seed: int) -> None:
        self.url, self.model, self.api_key, self.seed = url.rstrip("/"), model, api_key, seed

    def ask(self, spec: CheckSpec) -> tuple[Answer, str | None]:
        import urllib.error
        import urllib.request

        body = {"model": self.model, **request_body(spec, self.seed)}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + spec.endpoint, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as error:
            said = error.read().decode(errors="replace")
            try:
                said = json.loads(said).get("error", {}).get("message", said) if said else error.reason
            except (ValueError, AttributeError):
                pass
            raise CheckError(f"check {spec.name}: {self.url}{spec.endpoint} answered {error.code}: {str(said)[:300]}") from None
        except (urllib.error.URLError, OSError) as error:
            why = getattr(error, "reason", None) or error
            raise CheckError(f"cannot reach {self.url} ({why}); start it (`vdeploy up --detach`) or leave out --url") from None
        except ValueError:
            raise CheckError(f"check {spec.name}: {self.url}{spec.endpoint} did not answer JSON; is it a vLLM server?") from None
        return parse_answer(spec.name, payload, spec.prompt is None)

    def ask_all(self, specs: Sequence[CheckSpec], concurrency: int = 1) -> list[tuple[Answer, str | None]]:
        """Each check's answer, in order; `concurrency` at a time."""
        if concurrency <= 1:
            return [self.ask(spec) for spec in specs]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            return list(pool.map(self.ask, specs))


@dataclass(frozen=True)
class Answers:
    lone: dict[str, Answer]
    fingerprint: str | None
    load: LoadReport | None


def ask_checks(asker: Asker, specs: Sequence[CheckSpec], concurrency: int) -> Answers:
    """Each check alone, one after another; then, with concurrency N > 1, every check repeated
    until N are in flight together, each against its lone answer."""
    lone = asker.ask_all(specs)
    answers = {spec.name: answer for spec, (answer, _) in zip(specs, lone)}
    fingerprints = {fingerprint for _, fingerprint in lone}
    load = None
    if concurrency > 1:
        copies = -(-concurrency // len(specs))  # ceil: at least N requests, every check among them
        batch = [spec for _ in range(copies) for spec in specs]
        batched = asker.ask_all(batch, concurrency)
        load = load_report(concurrency, answers, [(spec.name, answer) for spec, (answer, _) in zip(batch, batched)])
    return Answers(answers, fingerprints.pop() if len(fingerprints) == 1 else None, load)


# ---- the command ---------------------------------------------------------------------------


def check(manifest_arg: str | os.PathLike[str] | None, options: CheckOptions,
          say: Callable[[str], None]) -> CheckReport:
    """`vdeploy check`: answers from the deployment (started here, or at --url), compared with the
    golden ones, or recorded as them (--record)."""
    from vdeploy.manifest import load_manifest

    if options.concurrency < 1:
        from vdeploy.errors import UsageError

        raise UsageError(f"--concurrency {options.concurrency}: give 1 or more")
    if options.tolerance < 0:
        from vdeploy.errors import UsageError

        raise UsageError(f"--tolerance {options.tolerance}: give 0 or more")
    manifest = load_manifest(manifest_arg)
    if not manifest.checks:
        raise CheckError(f"{manifest.path}: no [[check]] to ask; add one, e.g. [[check]] name = \"hello\" prompt = \"Hello\"")
    golden_path = manifest.folder / GOLDEN_NAME
    golden = Golden() if options.record and not golden_path.exists() else read_golden(golden_path)
    if options.url is not None:
        from vdeploy.hardware import read_hardware

        lock, plan = _planned_elsewhere(manifest)
        asker = Asker(options.url, plan.served_model_name, api_key(plan, manifest), lock.seed)
        answers = ask_checks(asker, manifest.checks, options.concurrency)
        check_fingerprint(answers.fingerprint, lock.deployment, options.url)
        hardware, run = read_hardware(os.environ)["class"], None
        url = options.url
    else:
        answers, hardware, run, prepared = _ask_started(manifest_arg, manifest, options, say)
        lock, url = prepared.lock, prepared.plan.url
    if options.record:
        from vdeploy.lockfile import lock_to_data

        seed = lock.seed
        checks = {spec.name: Recorded(recorded_request(spec, seed), answers.lone[spec.name]) for spec in manifest.checks}
        write_golden(golden_path, golden.with_entry(lock.deployment, hardware, lock_to_data(lock), checks))
        verdicts = tuple(Verdict(spec.name, "recorded") for spec in manifest.checks)
        return CheckReport(golden_path, lock.deployment, hardware, url, True, verdicts, None, answers.load, run)
    against = choose_entry(golden, lock, hardware)
    entry = golden.entry(against.deployment, against.hardware) if against.deployment and against.hardware else None
    # Under another deployment id a [runtime] seed may differ: the lock's diff names it, and the
    # answers show what it did; the request is otherwise the recorded one.
    ignored = () if against.own else ("seed",)
    verdicts = tuple(
        compare_answer(spec.name, entry.checks.get(spec.name) if entry else None,
                       recorded_request(spec, lock.seed), answers.lone[spec.name], options.tolerance, ignored)
        for spec in manifest.checks
    )
    return CheckReport(golden_path, lock.deployment, hardware, url, False, verdicts, against, answers.load, run)


def _ask_started(
    manifest_arg: str | os.PathLike[str] | None, manifest: Manifest, options: CheckOptions, say: Callable[[str], None],
) -> tuple[Answers, str, str, Prepared]:
    """Start the deployment (on a free loopback port unless [serve] names one), ask, stop it."""
    from vdeploy.launch import free_loopback_port, serve_during
    from vdeploy.prepare import Options, prepare

    host = port = None
    if "port" not in manifest.serve:
        port = free_loopback_port()
        host = "127.0.0.1" if "host" not in manifest.serve else None
    prepared = prepare(manifest_arg, Options(host=host, port=port, launching=True, fetch=options.fetch,
                                             allow_engine_drift=options.allow_engine_drift), say=say)
    for notice in prepared.notices:
        say(notice)
    asker = Asker(prepared.plan.url, prepared.plan.served_model_name, api_key(prepared.plan, manifest), prepared.lock.seed)
    doing = f"asking {len(manifest.checks)} check(s)"
    code, answers, record = serve_during(
        prepared, lambda record: ask_checks(asker, manifest.checks, options.concurrency), doing,
        options.pure, options.timeout, say,
    )
    if answers is None:
        raise CheckError(f"no answers: the deployment ended first (exit {code}); its record: {record.path}")
    return answers, str(record.hardware.get("class")), str(record.folder), prepared


def _planned_elsewhere(manifest: Manifest) -> tuple[Lock, Plan]:
    """The lock (current, checked) and its plan for a server this command does not start: the
    plan's served model name and secrets are all --url needs, so no engine is looked up here."""
    from vdeploy.lockfile import check_lock_is_current
    from vdeploy.plan import Launcher, make_plan
    from vdeploy.store import Store

    lock = check_lock_is_current(manifest)
    return lock, make_plan(lock, Store(manifest.store_path()), Launcher.cli("vllm"), None, base_dir=manifest.folder)


def api_key(plan: Plan, manifest: Manifest) -> str | None:
    """The key the server wants, read where the manifest says ([serve] api-key), as `up` reads it."""
    from vdeploy.constants import API_KEY_VARIABLE

    if API_KEY_VARIABLE not in plan.secrets:
        return None
    from vdeploy.launch import resolve_secrets

    return resolve_secrets(plan, os.environ, manifest.folder).get(API_KEY_VARIABLE)


def check_fingerprint(fingerprint: str | None, deployment: str, url: str) -> None:
    """vdeploy stamps every answer with its deployment id (--fingerprint-value): a live server of
    another lock is refused rather than compared as if it were this one."""
    if fingerprint and DEPLOYMENT_RE.fullmatch(fingerprint) and fingerprint != deployment:
        raise CheckError(
            f"{url} serves deployment {fingerprint[:16]}, not this lock's {deployment[:16]}; "
            "start this one (`vdeploy up --detach`) or leave out --url"
        )


def choose_entry(golden: Golden, lock: Lock, hardware: str) -> Against:
    """The golden entry to compare with: this deployment's, on this hardware class if recorded;
    else the recorded deployment whose lock differs least from this one (diff's changes)."""
    recorded = tuple(sorted(golden.deployments))
    if not recorded:
        return Against(None, None, False)
    if lock.deployment in golden.deployments:
        chosen, changes = lock.deployment, ()
    else:
        explained = {d: _lock_changes(golden, d, lock) for d in recorded}
        # The fewest differences first; a recorded id whose lock is unreadable last.
        chosen = min(recorded, key=lambda d: (explained[d] is None, len(explained[d] or ()), d))
        changes = tuple(explained[chosen] or ())
    classes = tuple(golden.classes(chosen))
    hardware_chosen = hardware if hardware in classes else (classes[0] if classes else None)
    return Against(chosen, hardware_chosen, chosen == lock.deployment, recorded, classes, changes)


def _lock_changes(golden: Golden, deployment: str, lock: Lock) -> list[str] | None:
    """diff's lines for the recorded lock against this one, None when the file holds no readable lock."""
    from vdeploy.diff import diff_locks
    from vdeploy.lockfile import lock_from_data

    data = golden.lock_data(deployment)
    if data is None:
        return None
    try:
        old = lock_from_data(json.loads(json.dumps(data)), f"{GOLDEN_NAME} (deployment {deployment[:16]})")
    except Exception:  # noqa: BLE001 - an unreadable recorded lock only loses the explanation
        return None
    result = diff_locks(old, lock, old_label="recorded", new_label="this lock")
    return result.render(headers=False)
