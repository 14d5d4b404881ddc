"""`vdeploy diff`, the comparison: two deployments (locks, or run records of what ran) → their
differences, grouped, each saying whether it can change what the server answers. Pure.

The texts it diffs (chat templates, generation_config.json, remote code) come through a `Texts`
reader the caller gives (sides.py reads the stores); reading anything else, or the network, or
vLLM, is not done here. Classification tables: effects.py.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vdeploy.changes import Change, Effect, mapping_changes, render_changes
from vdeploy.effects import env_effect, flag_effect
from vdeploy.lockfile import Lock, LockedFile, LockedSource

if TYPE_CHECKING:
    from vdeploy.flags import Catalogue

DIFF_FORMAT = 1  # of `vdeploy diff --json`; bump when its shape changes

WEIGHTS = "weights"
TOKENIZER = "tokenizer"
CHAT_TEMPLATE = "chat template"
SAMPLING = "sampling defaults"
REMOTE_CODE = "remote code"
SERVE = "serve flags"
SEED = "seed"
ENGINE = "engine"
PINNED_ENV = "pinned environment"
HARDWARE = "hardware"
INHERITED = "inherited environment"
DEPLOYMENT = "deployment"
GROUPS = (
    WEIGHTS, TOKENIZER, CHAT_TEMPLATE, SAMPLING, REMOTE_CODE, SERVE, SEED, ENGINE, PINNED_ENV,
    HARDWARE, INHERITED, DEPLOYMENT,
)

UNKNOWN = "unknown"
NOT_IN_STORE = "texts are not in the store"

# Files of a model folder that are the tokenizer's, by name.
TOKENIZER_FILES = frozenset({
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "spm.model", "qwen.tiktoken",
})
# Files of a model folder that never reach the engine.
DOC_SUFFIXES = (".md", ".gitattributes", ".png", ".jpg", ".jpeg", ".gif", ".svg", ".pdf")
DOC_PREFIXES = ("LICENSE", "NOTICE", "README", "USE_POLICY")
# generation_config.json keys that say who wrote the file, not how to sample.
SAMPLING_BOOKKEEPING = frozenset({"transformers_version", "_from_model_config"})


class Texts(Protocol):
    """Where the texts of files and chat templates come from (None: not there)."""

    def file(self, source: LockedSource, file: LockedFile) -> bytes | None: ...

    def template(self, sha256: str) -> bytes | None: ...


class NoTexts:
    def file(self, source: LockedSource, file: LockedFile) -> bytes | None:
        return None

    def template(self, sha256: str) -> bytes | None:
        return None


@dataclass(frozen=True)
class EngineFacts:
    """An engine as one side knows it: pinned by a lock, or found installed by a run."""

    distribution: str | None
    version: str | None
    packages: Mapping[str, str]  # normalised name → version: the lock's pins, or all installed
    image: str | None = None
    environment: tuple[str, str] | None = None  # the lock's engine-environment (file, sha256)
    origin: str = "lock"  # "lock" (pinned) or "run" (installed where it ran)
    complete: bool = True  # False: a lock pinning the engine alone, or a run that kept no packages

    @property
    def spec(self) -> str:
        return f"{self.distribution or UNKNOWN}=={self.version or UNKNOWN}"


@dataclass(frozen=True)
class RunFacts:
    """What a run actually ran, read off its record, or what a lock would run (its plan)."""

    flags: Mapping[str, Any] | None  # serve flags as the engine got them; None: unknown
    sources: Mapping[str, str]  # role → "models--org--name@commit" (code: the commit)
    chat_template: str | None  # sha256
    seed: str | None
    trust_remote_code: bool
    env: Mapping[str, str] | None  # pinned variables as the engine got them (secrets redacted)
    inherited: Mapping[str, str] | None = None  # the caller's unpinned variables the engine got
    hardware: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Side:
    """One side of a diff: a lock (from a file, a project or git), or a run record."""

    label: str  # as the user named it
    kind: str  # "lock" or "record"
    deployment: str | None
    lock: Lock | None  # for a record: the lock it ran from, when found
    engine: EngineFacts | None
    run: RunFacts | None = None  # for records, and for a lock compared with a record
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "kind": self.kind, "deployment": self.deployment, "notes": list(self.notes)}


@dataclass(frozen=True)
class Group:
    name: str
    changes: tuple[Change, ...] = ()
    compared: bool = True  # False: a side cannot tell (a lock has no hardware)
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "compared": self.compared, "notes": list(self.notes),
            "changes": [c.to_json() for c in self.changes],
        }


@dataclass(frozen=True)
class Diff:
    old: Side
    new: Side
    groups: tuple[Group, ...]

    @property
    def changes(self) -> list[Change]:
        return [c for g in self.groups for c in g.changes]

    @property
    def same(self) -> bool:
        """Equal deployment ids, and nothing operational differs either."""
        return self.old.deployment is not None and self.old.deployment == self.new.deployment and not self.changes

    @property
    def output_changes(self) -> int:
        return sum(1 for c in self.changes if c.changes_outputs)

    def summary(self) -> str:
        if self.same:
            return "same deployment"
        count = len(self.changes)
        return f"{count} difference{'' if count == 1 else 's'}; {self.output_changes} can change outputs"

    def render(self, headers: bool = True) -> list[str]:
        """The report a person reads: the two sides, each group by effect, then the summary."""
        lines = []
        if headers:
            for word, side in (("old", self.old), ("new", self.new)):
                deployment = side.deployment[:16] if side.deployment else UNKNOWN
                lines.append(f"{word}: {side.label} ({side.kind}, deployment {deployment})")
                lines += [f"  note: {note}" for note in side.notes]
        runs = "record" in (self.old.kind, self.new.kind)
        for group in self.groups:
            for effect in (Effect.OUTPUTS, Effect.UNKNOWN, Effect.OPERATIONAL):
                changes = [c for c in group.changes if c.effect is effect]
                if changes:
                    lines.append(f"{group.name}: {effect_words(effect)}")
                    lines += render_changes(changes)
            # Two locks never know hardware or inherited variables: saying so each time is noise.
            if group.notes and (group.changes or (runs and not group.compared)):
                if not group.changes:
                    lines.append(f"{group.name}: not compared")
                lines += [f"  note: {note}" for note in group.notes]
        lines.append(self.summary())
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DIFF_FORMAT,
            "old": self.old.to_json(),
            "new": self.new.to_json(),
            "same": self.same,
            "differences": len(self.changes),
            "changes_outputs": self.output_changes,
            "summary": self.summary(),
            "groups": [g.to_json() for g in self.groups],
        }


def effect_words(effect: Effect) -> str:
    return "unknown (treated as changes outputs)" if effect is Effect.UNKNOWN else effect.value


# ---- the comparison ------------------------------------------------------------------------


class _Groups:
    """Changes and notes collected per group, handed out in GROUPS order."""

    def __init__(self) -> None:
        self.changes: dict[str, list[Change]] = {name: [] for name in GROUPS}
        self.notes: dict[str, list[str]] = {name: [] for name in GROUPS}
        self.skipped: set[str] = set()

    def add(self, changes: Iterable[Change]) -> None:
        for change in changes:
            self.changes[change.group].append(change)

    def note(self, group: str, text: str, compared: bool = True) -> None:
        self.notes[group].append(text)
        if not compared:
            self.skipped.add(group)

    def result(self) -> tuple[Group, ...]:
        return tuple(
            Group(name, tuple(self.changes[name]), name not in self.skipped, tuple(self.notes[name]))
            for name in GROUPS
        )


def compare(old: Side, new: Side, texts: Texts | None = None) -> Diff:
    """Every difference between two sides, grouped in GROUPS order."""
    texts = texts or NoTexts()
    groups = _Groups()
    by_run = old.kind == "record" or new.kind == "record"
    if old.lock is not None and new.lock is not None:
        groups.add(lock_source_changes(old.lock, new.lock, texts))
    else:
        _run_source_changes(old.run, new.run, texts, groups)
    if by_run:
        _run_changes(old.run, new.run, groups)
    else:
        assert old.lock is not None and new.lock is not None
        groups.add(mapping_changes(old.lock.serve, new.lock.serve, SERVE, effect_of=flag_effect))
        groups.add(value_changes(SEED, "seed", old.lock.seed, new.lock.seed, Effect.OUTPUTS))
        groups.add(mapping_changes(old.lock.env, new.lock.env, PINNED_ENV, effect_of=env_effect))
        groups.add(value_changes(
            PINNED_ENV, "deterministic", old.lock.deterministic, new.lock.deterministic, Effect.OUTPUTS,
        ))
        for name in (HARDWARE, INHERITED):
            groups.note(name, "only run records know it", compared=False)
    _engine_changes(old.engine, new.engine, groups)
    if old.deployment != new.deployment and not any(groups.changes.values()):
        groups.add([Change(
            DEPLOYMENT, "deployment id", old.deployment or UNKNOWN, new.deployment or UNKNOWN, Effect.UNKNOWN,
            detail="the ids differ in an input this diff does not compare (a lock of another format, say)",
        )])
    return Diff(old, new, groups.result())


def value_changes(group: str, what: str, old: Any, new: Any, effect: Effect) -> list[Change]:
    return [] if old == new else [Change(group, what, old, new, effect)]


# ---- files of the locked sources -----------------------------------------------------------


def source_key(source: LockedSource) -> str:
    """How a source is named in a diff: its role, and for code repos the repo too."""
    return f"code {source.repo}" if source.role == "code" else source.role


def file_group(role: str, path: str) -> str:
    """Which group a locked file belongs to."""
    name = path.rsplit("/", 1)[-1]
    if role == "code" or name.endswith(".py"):
        return REMOTE_CODE
    if name.endswith(".jinja") or name == "chat_template.json":
        return CHAT_TEMPLATE
    if role == "model" and name == "generation_config.json":
        return SAMPLING
    if role == "tokenizer" or name.startswith("tokenizer") or name in TOKENIZER_FILES or name.endswith(".tiktoken"):
        return TOKENIZER
    return WEIGHTS


def _source_group(role: str) -> str:
    return {"tokenizer": TOKENIZER, "code": REMOTE_CODE}.get(role, WEIGHTS)


def _is_doc(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.endswith(DOC_SUFFIXES) or name.upper().startswith(DOC_PREFIXES)


def _label(key: str, path: str) -> str:
    return path if key == "model" else f"{key}: {path}"


def _file_value(file: LockedFile | None) -> dict[str, Any] | None:
    return None if file is None else {"size": file.size, "sha256": file.sha256}


def _file_shown(file: LockedFile | None) -> str | None:
    return None if file is None else f"{file.size:,} bytes, sha256 {file.sha256[:12]}"


def lock_source_changes(old: Lock, new: Lock, texts: Texts) -> list[Change]:
    """Sources, files, auto_map entries, the chat template and the policy of two locks."""
    trusted = old.trusts_remote_code or new.trusts_remote_code
    before = {source_key(s): s for s in old.sources}
    after = {source_key(s): s for s in new.sources}
    source_lines: list[Change] = []
    file_lines: list[Change] = []
    for key in sorted(before.keys() | after.keys(), key=_role_order):
        was, now = before.get(key), after.get(key)
        changed = _file_changes(key, was, now, texts, trusted)
        file_lines += changed
        described_was, described_now = _describe_source(was), _describe_source(now)
        if described_was != described_now:
            role = (now or was).role  # type: ignore[union-attr]
            effect = Effect.OUTPUTS if any(c.changes_outputs for c in changed) else Effect.OPERATIONAL
            what, shown = _source_named(key, described_was, described_now)
            source_lines.append(Change(
                _source_group(role), what, described_was, described_now, effect,
                detail=None if changed else "the same files", shown=shown,
            ))
        file_lines += _auto_map_changes(key, was, now, trusted)
    return source_lines + file_lines + _template_changes(old, new, texts) + _policy_changes(old, new)


def _role_order(key: str) -> tuple[int, str]:
    order = ("model", "tokenizer", "draft")
    return (order.index(key) if key in order else len(order), key)


def _describe_source(source: LockedSource | None) -> dict[str, Any] | None:
    if source is None:
        return None
    where = {"repo": source.repo, "revision": source.revision} if source.repo is not None else {"path": source.path}
    return {**where, "commit": source.commit}


def _source_named(key: str, was: Mapping[str, Any] | None, now: Mapping[str, Any] | None) -> tuple[str, tuple]:
    """What changed and how old and new read: "model source org/x main changed: <commit> → <commit>"
    when only the commit moved, else each side's repo, revision and commit."""
    where_was, where_now = _source_where(was), _source_where(now)
    if was is not None and now is not None and where_was == where_now:
        return f"{key} source {where_now}", (was["commit"][:12], now["commit"][:12])
    shown = tuple(None if d is None else f"{w} ({d['commit'][:12]})" for w, d in ((where_was, was), (where_now, now)))
    return f"{key} source", shown


def _source_where(described: Mapping[str, Any] | None) -> str | None:
    if described is None:
        return None
    return f"{described['repo']} {described['revision']}" if "repo" in described else f"path {described['path']}"


def _file_changes(
    key: str, was: LockedSource | None, now: LockedSource | None, texts: Texts, trusted: bool
) -> list[Change]:
    old_files = {f.path: f for f in (was.files if was else ())}
    new_files = {f.path: f for f in (now.files if now else ())}
    role = (now or was).role  # type: ignore[union-attr]
    changes = []
    for path in sorted(old_files.keys() | new_files.keys()):
        before, after = old_files.get(path), new_files.get(path)
        if before is not None and after is not None and before.sha256 == after.sha256:
            continue
        group = file_group(role, path)
        label = _label(key, path)
        if group == SAMPLING:
            changes += _sampling_changes(label, (was, before), (now, after), texts)
            continue
        if group == REMOTE_CODE:
            effect = Effect.OUTPUTS if trusted else Effect.OPERATIONAL
        elif group == WEIGHTS and _is_doc(path):
            effect = Effect.OPERATIONAL
        else:
            effect = Effect.OUTPUTS
        detail = None
        if _diffed_as_text(group, path) and after is not None:
            detail = _text_detail(
                label, texts.file(was, before) if before else b"", texts.file(now, after)  # type: ignore[arg-type]
            )
        if group == REMOTE_CODE and not trusted:
            detail = "\n".join(filter(None, [detail, "not run: trust-remote-code is off on both sides"]))
        changes.append(Change(
            group, label, _file_value(before), _file_value(after), effect, detail,
            shown=(_file_shown(before), _file_shown(after)),
        ))
    return changes


def _diffed_as_text(group: str, path: str) -> bool:
    """Templates and code; and tokenizer_config.json, where a model's default chat template lives."""
    if group in (CHAT_TEMPLATE, REMOTE_CODE):
        return path.endswith((".py", ".jinja", ".json"))
    return path.rsplit("/", 1)[-1] == "tokenizer_config.json"


def _text_detail(name: str, old: bytes | None, new: bytes | None) -> str:
    """A unified diff of two texts, or why there is none."""
    if old is None or new is None:
        return NOT_IN_STORE
    diff = difflib.unified_diff(
        _lines(old), _lines(new), f"a/{name}", f"b/{name}", lineterm="", n=3,
    )
    return "\n".join(diff) or "the same text"


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines()


def _sampling_changes(
    label: str,
    old: tuple[LockedSource | None, LockedFile | None],
    new: tuple[LockedSource | None, LockedFile | None],
    texts: Texts,
) -> list[Change]:
    """generation_config.json key by key, when both texts are at hand; else the file."""
    configs = [_json_config(texts, source, file) for source, file in (old, new)]
    if configs[0] is not None and configs[1] is not None:
        changes = mapping_changes(configs[0], configs[1], SAMPLING, effect_of=_sampling_effect)
        if changes:
            return changes
    detail = NOT_IN_STORE if None in configs else "the same keys and values"
    effect = Effect.OPERATIONAL if detail != NOT_IN_STORE else Effect.OUTPUTS
    return [Change(
        SAMPLING, label, _file_value(old[1]), _file_value(new[1]), effect, detail,
        shown=(_file_shown(old[1]), _file_shown(new[1])),
    )]


def _json_config(texts: Texts, source: LockedSource | None, file: LockedFile | None) -> dict[str, Any] | None:
    """The parsed file; {} for a side without it; None when its text is not at hand."""
    if source is None or file is None:
        return {}
    data = texts.file(source, file)
    if data is None:
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _sampling_effect(key: str) -> Effect:
    return Effect.OPERATIONAL if key in SAMPLING_BOOKKEEPING else Effect.OUTPUTS


def _auto_map_changes(key: str, was: LockedSource | None, now: LockedSource | None, trusted: bool) -> list[Change]:
    before = {(e.config, e.key): e.target for e in (was.auto_map if was else ())}
    after = {(e.config, e.key): e.target for e in (now.auto_map if now else ())}
    effect = Effect.OUTPUTS if trusted else Effect.OPERATIONAL
    return [
        Change(REMOTE_CODE, f"{key}: {config} auto_map.{name}", before.get((config, name)), after.get((config, name)), effect)
        for config, name in sorted(before.keys() | after.keys())
        if before.get((config, name)) != after.get((config, name))
    ]


def _template_changes(old: Lock, new: Lock, texts: Texts) -> list[Change]:
    was, now = old.chat_template, new.chat_template
    before, after = (was.sha256 if was else None), (now.sha256 if now else None)
    if before != after:
        return [_template_change(before, after, texts)]
    if was is not None and now is not None and (was.origin, was.file) != (now.origin, now.file):
        return [Change(
            CHAT_TEMPLATE, "[chat-template] file", was.file or was.origin, now.file or now.origin,
            Effect.OPERATIONAL, "the same bytes",
        )]
    return []


def _template_change(before: str | None, after: str | None, texts: Texts) -> Change:
    """The manifest's chat template (the one vLLM gets with --chat-template), by sha256 and text."""
    old_text = texts.template(before) if before else b""
    new_text = texts.template(after) if after else b""
    detail = None if after is None else _text_detail("chat-template.jinja", old_text, new_text)
    return Change(CHAT_TEMPLATE, "[chat-template]", before, after, Effect.OUTPUTS, detail)


def _policy_changes(old: Lock, new: Lock) -> list[Change]:
    before = old.inputs.get("policy", {}) if isinstance(old.inputs.get("policy"), dict) else {}
    after = new.inputs.get("policy", {}) if isinstance(new.inputs.get("policy"), dict) else {}
    changes = []
    for key, group, effect in (
        ("trust-remote-code", REMOTE_CODE, Effect.OUTPUTS),
        # What it lets in shows as weights files and serve flags; the switch itself runs nothing.
        ("allow-pickle", WEIGHTS, Effect.OPERATIONAL),
    ):
        changes += value_changes(group, f"[policy] {key}", before.get(key), after.get(key), effect)
    return changes


# ---- what ran: run records, and what a lock would run ---------------------------------------

SNAPSHOT_RE = re.compile(r"""[^\s"',]*/(models--[^/\s"',]+)/snapshots/([0-9a-f]{40})""")
TEMPLATE_RE = re.compile(r"""[^\s"',]*/chat-templates/([0-9a-f]{64})\.jinja""")
# Flags vdeploy adds from the lock; in a diff they are the sources, template, seed and policy.
PLANNED_FLAGS = ("model", "tokenizer", "chat-template", "seed", "trust-remote-code", "code-revision")
# Variables that name a machine's store, not an input.
MACHINE_VARIABLES = frozenset({"HF_HUB_CACHE"})


def parse_argv(argv: list[str]) -> dict[str, Any]:
    """The engine's command line as flags: `--x v` → "v", `--x a b` → [a, b], `--x` → True,
    `--no-x` → x = False, a repeated flag → the list of its values; the model positional (after
    `serve`) → "model". Store paths become `models--org--name@commit` and template shas."""
    tokens = [_machine_free(str(t)) for t in argv]
    flags: dict[str, Any] = {}
    start = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))
    if "serve" in tokens[:start] and tokens.index("serve") + 1 < start:
        flags["model"] = tokens[tokens.index("serve") + 1]
    index = start
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--"):
            continue
        name, has_value, value = token[2:].partition("=")
        values = [value] if has_value else []
        while not has_value and index < len(tokens) and not tokens[index].startswith("--"):
            values.append(tokens[index])
            index += 1
        parsed: Any = True if not values else values[0] if len(values) == 1 else values
        if not values and name.startswith("no-"):
            name, parsed = name[3:], False
        if name in flags:
            earlier = flags[name] if isinstance(flags[name], list) else [flags[name]]
            parsed = earlier + (parsed if isinstance(parsed, list) else [parsed])
        flags[name] = parsed
    return flags


def _machine_free(text: str) -> str:
    text = SNAPSHOT_RE.sub(lambda m: f"{m.group(1)}@{m.group(2)}", text)
    return TEMPLATE_RE.sub(lambda m: m.group(1), text)


def run_facts(
    argv: list[str] | None,
    deployment: str | None,
    env: Mapping[str, str] | None,
    inherited: Mapping[str, str] | None = None,
    hardware: Mapping[str, Any] | None = None,
) -> RunFacts:
    """What ran, from the engine's argv and environment (a record's, or a plan's)."""
    flags = parse_argv(argv) if argv is not None else None
    sources: dict[str, str] = {}
    template = seed = None
    trust = False
    if flags is not None:
        for role in ("model", "tokenizer"):
            if isinstance(flags.get(role), str):
                sources[role] = flags[role]
        if isinstance(flags.get("code-revision"), str):
            sources["code"] = flags["code-revision"]
        template = flags.get("chat-template") if isinstance(flags.get("chat-template"), str) else None
        seed = str(flags["seed"]) if "seed" in flags else None
        trust = flags.get("trust-remote-code") is True
        flags = _serve_flags(flags, sources, deployment)
    pinned = None
    if env is not None:
        pinned = {k: v for k, v in env.items() if k not in (inherited or {}) and k not in MACHINE_VARIABLES}
    return RunFacts(
        flags=flags, sources=sources, chat_template=template, seed=seed, trust_remote_code=trust,
        env=pinned, inherited=inherited, hardware=hardware,
    )


def _serve_flags(flags: dict[str, Any], sources: dict[str, str], deployment: str | None) -> dict[str, Any]:
    """The flags left once the ones vdeploy derives from the lock are taken out."""
    serve = {k: v for k, v in flags.items() if k not in PLANNED_FLAGS}
    if serve.get("generation-config") == sources.get("model"):
        del serve["generation-config"]  # the locked model folder's, as vdeploy passes it
    if deployment is not None and serve.get("fingerprint-value") == deployment:
        del serve["fingerprint-value"]
        if serve.get("fingerprint-mode") == "custom":
            del serve["fingerprint-mode"]
    speculative = serve.get("speculative-config")
    if isinstance(speculative, str):
        try:
            parsed = json.loads(speculative)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            if isinstance(parsed.get("model"), str):
                sources["draft"] = parsed.pop("model")
            serve["speculative-config"] = parsed
    return serve


def planned_run(lock: Lock, catalogue: Catalogue | None = None) -> RunFacts:
    """What `up` would run from a lock, in the terms of a run record, to compare the two."""
    from pathlib import PurePosixPath

    from vdeploy.constants import REDACTED
    from vdeploy.plan import Launcher, make_plan
    from vdeploy.store import Store

    plan = make_plan(lock, Store(PurePosixPath("/store")), Launcher.cli("vllm"), catalogue)
    env = {**plan.env, **{name: REDACTED for name in plan.secret_variables}}
    return run_facts(list(plan.argv), lock.deployment, env)


def _run_changes(old: RunFacts | None, new: RunFacts | None, groups: _Groups) -> None:
    """Serve flags, seed, pinned and inherited environment and hardware, as they ran."""
    if old is None or new is None:
        for name in (SERVE, SEED, PINNED_ENV, HARDWARE, INHERITED):
            groups.note(name, "a side has no run facts", compared=False)
        return
    if old.flags is None or new.flags is None:
        groups.add([Change(SERVE, "serve flags", _known(old.flags), _known(new.flags), Effect.UNKNOWN,
                           "a run record without the engine's argv")])
    else:
        groups.add(mapping_changes(old.flags, new.flags, SERVE, effect_of=flag_effect))
    groups.add(value_changes(SEED, "seed", old.seed or UNKNOWN, new.seed or UNKNOWN, Effect.OUTPUTS))
    if old.env is None or new.env is None:
        groups.add([Change(PINNED_ENV, "environment", _known(old.env), _known(new.env), Effect.UNKNOWN,
                           "a run record without its environment")])
    else:
        groups.add(mapping_changes(old.env, new.env, PINNED_ENV, effect_of=env_effect))
    _hardware_changes(old.hardware, new.hardware, groups)
    _inherited_changes(old.inherited, new.inherited, groups)


def _known(value: Any) -> str:
    return UNKNOWN if value is None else "known"


def _hardware_changes(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, groups: _Groups) -> None:
    if old is None or new is None:
        groups.note(HARDWARE, "only run records know the hardware; a side is a lock", compared=False)
        return
    old_class, new_class = old.get("class"), new.get("class")
    if old_class is not None and new_class is not None:
        groups.add(value_changes(HARDWARE, "class", old_class, new_class, Effect.OUTPUTS))
        return
    if old_class is not None or new_class is not None:
        groups.add([Change(HARDWARE, "class", old_class or UNKNOWN, new_class or UNKNOWN, Effect.UNKNOWN)])
        return
    groups.note(HARDWARE, "records without a hardware class: compared by what they hold")
    groups.add(mapping_changes(old, new, HARDWARE, effect_of=lambda name: Effect.UNKNOWN))


def _inherited_changes(old: Mapping[str, str] | None, new: Mapping[str, str] | None, groups: _Groups) -> None:
    if old is not None and new is not None:
        groups.add(mapping_changes(old, new, INHERITED, effect_of=env_effect))
        return
    ran = old if old is not None else new
    if ran:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(ran.items()))
        groups.note(INHERITED, f"the run inherited {listed}; a lock inherits nothing, so this is not compared",
                    compared=False)
    else:
        groups.note(INHERITED, "only run records know what the caller's environment added", compared=False)


def _run_source_changes(old: RunFacts | None, new: RunFacts | None, texts: Texts, groups: _Groups) -> None:
    """Sources by commit and the template by sha256: all a run record tells without its lock."""
    if old is None or new is None:
        return
    for role in sorted(old.sources.keys() | new.sources.keys(), key=_role_order):
        group = _source_group(role)
        before, after = old.sources.get(role), new.sources.get(role)
        if before != after:
            groups.add([Change(group, f"{role} source", before, after, Effect.OUTPUTS, shown=(
                _store_name_shown(before), _store_name_shown(after)
            ))])
            groups.note(group, "a run record's lock was not found: files are compared by commit only")
    if old.chat_template != new.chat_template:
        groups.add([_template_change(old.chat_template, new.chat_template, texts)])
    groups.add(value_changes(
        REMOTE_CODE, "trust-remote-code", old.trust_remote_code, new.trust_remote_code, Effect.OUTPUTS
    ))


def _store_name_shown(value: str | None) -> str | None:
    """"models--org--name@<commit>" → "org/name (<commit[:12]>)"."""
    if value is None:
        return None
    name, _, commit = value.partition("@")
    if not commit:
        return value[:12] if re.fullmatch(r"[0-9a-f]{40}", value) else value
    return f"{name.removeprefix('models--').replace('--', '/')} ({commit[:12]})"


# ---- engine --------------------------------------------------------------------------------


def _engine_changes(old: EngineFacts | None, new: EngineFacts | None, groups: _Groups) -> None:
    if old is None and new is None:
        groups.note(ENGINE, "neither side names an engine", compared=False)
        return
    if old is None or new is None:
        groups.add([Change(ENGINE, "engine", old.spec if old else UNKNOWN, new.spec if new else UNKNOWN, Effect.UNKNOWN)])
        return
    changes = value_changes(ENGINE, "distribution", old.distribution or UNKNOWN, new.distribution or UNKNOWN, Effect.OUTPUTS)
    if old.origin == new.origin == "lock":
        changes += value_changes(ENGINE, "image", old.image, new.image, Effect.OUTPUTS)
        changes += _environment_changes(old, new)
    names = _compared_packages(old, new, groups)
    same = _same_version if old.origin != new.origin else (lambda a, b: a == b)
    for name in sorted(names):
        before, after = old.packages.get(name), new.packages.get(name)
        if before is None and after is None:
            continue
        if before is None or after is None or not same(before, after):
            changes.append(Change(ENGINE, name, before, after, Effect.OUTPUTS))
    groups.add(changes)


def _environment_changes(old: EngineFacts, new: EngineFacts) -> list[Change]:
    before, after = old.environment, new.environment
    if before == after:
        return []
    if before is None or after is None:
        return [Change(ENGINE, "engine-environment", before and before[0], after and after[0], Effect.OUTPUTS)]
    changes = value_changes(ENGINE, "engine-environment file", before[0], after[0], Effect.OPERATIONAL)
    if before[1] != after[1]:
        # The pins show one by one; bytes that differ with the same pins are comments or hashes.
        effect = Effect.OPERATIONAL if dict(old.packages) == dict(new.packages) else Effect.OUTPUTS
        changes.append(Change(ENGINE, "engine-environment sha256", before[1], after[1], effect))
    return changes


def _compared_packages(old: EngineFacts, new: EngineFacts, groups: _Groups) -> set[str]:
    """A lock against a run: the packages the lock pins (the rest of what was installed is not
    pinned, so not a difference). Two locks or two runs: every package either names."""
    if old.origin == new.origin:
        return set(old.packages) | set(new.packages)
    lock = old if old.origin == "lock" else new
    if not lock.complete:
        groups.note(ENGINE, f"the lock pins {lock.spec} alone: the run's other packages are not compared")
    return set(lock.packages)


def _same_version(a: str, b: str) -> bool:
    """pip's `==` either way round: "2.13.0" pinned is "2.13.0+cpu" installed."""
    from vdeploy.engine import version_matches

    return version_matches(a, b) or version_matches(b, a)


def lock_engine_facts(lock: Lock) -> EngineFacts | None:
    engine = lock.engine
    if engine is None:
        return None
    return EngineFacts(
        distribution=engine.distribution, version=engine.version, packages=engine.pins, image=engine.image,
        environment=None if engine.environment is None else (engine.environment.file, engine.environment.sha256),
        complete=engine.environment is not None,
    )


def lock_side(label: str, lock: Lock, notes: tuple[str, ...] = (), engine: EngineFacts | None = None) -> Side:
    return Side(label, "lock", lock.deployment, lock, engine or lock_engine_facts(lock), notes=notes)


def diff_locks(old: Lock, new: Lock, texts: Texts | None = None, old_label: str = "old", new_label: str = "new") -> Diff:
    """What changes from one lock to another (`lock --update` prints it before it writes)."""
    return compare(lock_side(old_label, old), lock_side(new_label, new), texts)

