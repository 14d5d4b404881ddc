"""Step 1 of the flow: read vdeploy.toml into a checked, frozen Manifest (no network, no vLLM)."""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vdeploy.constants import LOCK_NAME, MANIFEST_NAME, OWNED_VARIABLES, default_hf_cache, names_a_secret
from vdeploy.errors import ManifestError, VdeployError
from vdeploy.safety import argument_problem

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
VARIABLE_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
IMAGE_DIGEST_RE = re.compile(r"[a-z0-9][a-z0-9._:/-]*@sha256:[0-9a-f]{64}")
# One exact pin of a constraints file: name (extras allowed, ignored) == version.
PIN_RE = re.compile(r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[A-Za-z0-9._,-]*\])?==(?P<version>[A-Za-z0-9][A-Za-z0-9.+!_-]*)")
HASH_OPTION_RE = re.compile(r"--hash=sha256:[0-9a-f]{64}")
# The Hub's rule (huggingface_hub validate_repo_id): word characters, '-' and '.' inside, at most
# 96 of them, and no "--" or ".." (which the cache layout models--org--name relies on).
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
REPO_ID_RE = re.compile(rf"^(?:{_REPO_PART}/)?{_REPO_PART}$")
# What git refuses in a branch or tag name (git check-ref-format), plus whitespace.
BAD_REF_RE = re.compile(r"(\.\.|[\x00-\x20\x7f~^:?*\[\\]|@\{|^[/.-]|/$|\.lock$|//|\.$)")

# Flags vdeploy sets itself from the lock; in [serve] they would bypass the pinning.
OWNED_FLAGS = {
    "model": "[model] repo or path",
    "tokenizer": "[tokenizer]",
    "revision": "[model] revision",
    "tokenizer-revision": "[tokenizer] revision",
    "code-revision": "[model] revision (code is pinned with the model)",
    "download-dir": "[store] download-dir",
    "seed": "[runtime] seed",
    "chat-template": "[chat-template]",
    "trust-remote-code": "[policy] trust-remote-code",
}

# Flags that change how the server is reached or logged, never what it answers: recorded,
# kept out of the deployment id, and overridable at `up` time.
OPERATIONAL_FLAGS = frozenset({
    "host", "port", "uds", "api-key", "ssl-keyfile", "ssl-certfile", "ssl-ca-certs",
    "ssl-cert-reqs", "allowed-origins", "allowed-methods", "allowed-headers",
    "allow-credentials", "enable-log-requests", "enable-log-outputs", "disable-log-stats",
    "uvicorn-log-level", "root-path", "disable-uvicorn-access-log", "enable-ssl-refresh",
    "disable-fastapi-docs", "max-log-len",
})

SOURCE_KEYS = ("repo", "path", "revision", "include")
TABLE_KEYS: dict[str, tuple[str, ...] | None] = {
    "model": SOURCE_KEYS,
    "tokenizer": SOURCE_KEYS,
    "chat-template": ("file", "text"),
    "serve": None,  # any flag; checked against the engine's catalogue elsewhere
    "runtime": ("seed", "env", "engine", "engine-environment", "engine-image", "deterministic"),
    "policy": ("trust-remote-code", "allow-pickle"),
    "store": ("download-dir",),
}


@dataclass(frozen=True)
class SourceSpec:
    """Where model (or tokenizer) files come from: a Hub repo at a revision, or a local folder."""

    role: str  # "model" or "tokenizer"
    repo: str | None = None
    path: Path | None = None  # absolute, resolved against the manifest's folder
    path_as_written: str | None = None
    revision: str = "main"
    include: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def requested(self) -> dict[str, Any]:
        """The manifest's own words for this source, as the lock records them."""
        wanted: dict[str, Any] = {}
        if self.repo is not None:
            wanted["repo"] = self.repo
            wanted["revision"] = self.revision
        else:
            wanted["path"] = self.path_as_written
        if self.include:
            wanted["include"] = list(self.include)
        return wanted


@dataclass(frozen=True)
class ChatTemplateSpec:
    """The template's bytes, read once when the manifest is parsed, and their sha256."""

    data: bytes
    file: Path | None = None  # absolute, resolved against the manifest's folder
    file_as_written: str | None = None
    text: str | None = None

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)

    @property
    def origin(self) -> str:
        return "inline" if self.text is not None else "file"


@dataclass(frozen=True)
class EngineEnvironmentSpec:
    """[runtime] engine-environment: a constraints file of exact pins, read once at parse."""

    file_as_written: str
    path: Path
    data: bytes
    pins: tuple[tuple[str, str], ...]  # (normalised name, version), sorted

    @property
    def sha256(self) -> str:
        return sha256_hex(self.data)


@dataclass(frozen=True)
class Policy:
    trust_remote_code: bool | str = False  # False or "pinned"
    allow_pickle: bool = False


@dataclass(frozen=True)
class Manifest:
    path: Path  # the manifest file, absolute
    model: SourceSpec
    tokenizer: SourceSpec | None = None
    chat_template: ChatTemplateSpec | None = None
    serve: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    env: dict[str, Any] = field(default_factory=dict)  # NAME → value, or { env = "X" } / { file = "p" }
    engine: str | None = None
    engine_environment: EngineEnvironmentSpec | None = None
    engine_image: str | None = None  # "repo@sha256:<64 hex>"
    policy: Policy = Policy()
    download_dir: str | None = None  # as written; see store_path()
    draft: SourceSpec | None = None  # the draft model named in [serve] speculative-config
    deterministic: bool = False  # [runtime] deterministic: vLLM's batch-invariant mode (an input)
    checks: tuple[CheckSpec, ...] = ()  # [[check]]: golden prompts, operational (not inputs)

    @property
    def folder(self) -> Path:
        return self.path.parent

    @property
    def lock_path(self) -> Path:
        return self.folder / LOCK_NAME

    @property
    def sources(self) -> list[SourceSpec]:
        return [s for s in (self.model, self.tokenizer, self.draft) if s is not None]

    def store_path(self) -> Path:
        """The store folder: the manifest's download-dir, else the Hugging Face cache."""
        if self.download_dir is not None:
            return (self.folder / os.path.expanduser(self.download_dir)).resolve()
        return default_hf_cache()

    def inputs(self) -> dict[str, Any]:
        """Everything the lock is a function of, in the manifest's own terms (for staleness)."""
        environment = None
        if self.engine_environment is not None:
            environment = {"file": self.engine_environment.file_as_written, "sha256": self.engine_environment.sha256}
        return inputs_record(
            self.sources, self.chat_template.sha256 if self.chat_template else None, self.serve,
            self.seed, self.env, self.engine, environment, self.engine_image, self.policy,
            self.deterministic,
        )

    def inputs_hash(self) -> str:
        return sha256_hex(canonical_json(self.inputs()))


def inputs_record(
    sources: list[SourceSpec],
    template_sha256: str | None,
    serve: dict[str, Any],
    seed: int,
    env: dict[str, Any],
    engine: str | None,
    engine_environment: dict[str, str] | None,
    engine_image: str | None,
    policy: Policy,
    deterministic: bool = False,
) -> dict[str, Any]:
    """The lock's [inputs]: a manifest's words, in the one form `lock` records and staleness compares."""
    inputs: dict[str, Any] = {source.role: source.requested() for source in sources}
    if template_sha256 is not None:
        inputs["chat-template"] = {"sha256": template_sha256}
    inputs["serve"] = dict(sorted(serve.items()))
    inputs["runtime"] = {"seed": seed, "env": dict(sorted(env.items()))}
    if engine is not None:
        inputs["runtime"]["engine"] = engine
    if engine_environment is not None:
        inputs["runtime"]["engine-environment"] = engine_environment
    if engine_image is not None:
        inputs["runtime"]["engine-image"] = engine_image
    if deterministic:
        # Written only when on, so the locks of manifests that never set it keep their bytes.
        inputs["runtime"]["deterministic"] = True
    inputs["policy"] = {"trust-remote-code": policy.trust_remote_code, "allow-pickle": policy.allow_pickle}
    return inputs


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_manifest(arg: str | os.PathLike[str] | None) -> Path:
    """A manifest argument: a file, or a folder holding vdeploy.toml (default: the current one)."""
    candidate = Path(arg) if arg is not None else Path(MANIFEST_NAME)
    if candidate.is_dir():
        candidate = candidate / MANIFEST_NAME
    if not candidate.is_file():
        raise ManifestError(
            f"{candidate}: no manifest here; write one (see `vdeploy init --help`) or pass its path"
        )
    return candidate.resolve()


def load_manifest(arg: str | os.PathLike[str] | None = None) -> Manifest:
    path = find_manifest(arg)
    text = path.read_bytes().decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    return parse_manifest(data, path, text)


def parse_manifest(data: dict[str, Any], path: Path, text: str = "") -> Manifest:
    """Check the parsed TOML strictly and build the Manifest. Pure, apart from reading the chat template."""
    check = Checker(path, text)
    data = dict(data)
    checks = parse_checks(check, data.pop("check", []))
    _check_table_keys(check, data, TABLE_KEYS)
    if "model" not in data:
        check.fail(None, None, "missing [model] table", "add [model] with repo = \"org/name\" or path = \"./folder\"")
    model = _parse_source(check, "model", data["model"])
    tokenizer = _parse_source(check, "tokenizer", data["tokenizer"]) if "tokenizer" in data else None
    chat_template = _parse_chat_template(check, data.get("chat-template"))
    serve = _parse_serve(check, data.get("serve", {}))
    runtime = data.get("runtime", {})
    seed, env, engine, engine_image = _parse_runtime(check, runtime)
    engine_environment = _parse_engine_environment(check, runtime.get("engine-environment"))
    deterministic = _parse_deterministic(check, runtime)
    policy = _parse_policy(check, data.get("policy", {}))

    download_dir = data.get("store", {}).get("download-dir")
    if download_dir is not None and (not isinstance(download_dir, str) or not download_dir):
        check.fail("store", "download-dir", "must be a non-empty path string")

    return Manifest(
        path=path,
        model=model,
        tokenizer=tokenizer,
        chat_template=chat_template,
        serve=serve,
        seed=seed,
        env=dict(env),
        engine=engine,
        engine_environment=engine_environment,
        engine_image=engine_image,
        policy=policy,
        download_dir=download_dir,
        draft=_parse_draft(check, serve),
        deterministic=deterministic,
        checks=checks,
    )


# A lock's [inputs]: the manifest's tables in the words `lock` records them (manifest.inputs()).
INPUT_TABLES: dict[str, tuple[str, ...] | None] = {
    "model": SOURCE_KEYS,
    "tokenizer": SOURCE_KEYS,
    "draft": SOURCE_KEYS,
    "chat-template": ("sha256",),
    "serve": None,
    "runtime": ("seed", "env", "engine", "engine-environment", "engine-image", "deterministic"),
    "policy": ("trust-remote-code", "allow-pickle"),
}


def check_inputs(inputs: Any, check: Checker) -> dict[str, Any]:
    """A lock's [inputs], checked table by table by the rules the manifest's tables go through.

    Returns them as a manifest with these words would record them; anything else in them (a key
    added, dropped or retyped by hand) is refused. Reads no file.
    """
    if not isinstance(inputs, dict):
        check.fail(None, None, "must be a table")
    _check_table_keys(check, inputs, INPUT_TABLES)
    if "model" not in inputs:
        check.fail(None, None, "has no model")
    sources = [_parse_source(check, role, inputs[role]) for role in ("model", "tokenizer") if role in inputs]
    serve = _parse_serve(check, inputs.get("serve", {}))
    draft = _parse_draft(check, serve)
    if draft is not None:
        sources.append(draft)
    template_sha256 = None
    if "chat-template" in inputs:
        template_sha256 = inputs["chat-template"].get("sha256")
        if not isinstance(template_sha256, str) or not SHA256_RE.fullmatch(template_sha256):
            check.fail("chat-template", "sha256", f"{template_sha256!r} is not a sha256")
    runtime = inputs.get("runtime", {})
    seed, env, engine, engine_image = _parse_runtime(check, runtime)
    environment = runtime.get("engine-environment")
    if environment is not None and not (
        isinstance(environment, dict) and set(environment) == {"file", "sha256"}
        and isinstance(environment["file"], str) and environment["file"] and not argument_problem(environment["file"])
        and isinstance(environment["sha256"], str) and SHA256_RE.fullmatch(environment["sha256"])
    ):
        check.fail("runtime", "engine-environment", 'must be { file = "...", sha256 = "<64 hex>" }')
    policy = _parse_policy(check, inputs.get("policy", {}))
    deterministic = _parse_deterministic(check, runtime)
    if runtime.get("deterministic", True) is not True:
        check.fail("runtime", "deterministic", "is recorded only when true")
    recorded = inputs_record(
        sources, template_sha256, serve, seed, env, engine, environment, engine_image, policy, deterministic,
    )
    if canonical_json(recorded) != canonical_json(inputs):
        check.fail(None, None, "is not what `vdeploy lock` records for these words: it was edited by hand")
    return recorded


def _check_table_keys(check: Checker, data: dict[str, Any], tables: dict[str, tuple[str, ...] | None]) -> None:
    """Every table is known and a table, and holds only its known keys."""
    for table, value in data.items():
        if table not in tables:
            check.fail(table, None, f"unknown table [{check.prefix}{table}]", check.suggest(table, tables))
        if not isinstance(value, dict):
            check.fail(table, None, f"'{table}' must be a table: [{check.prefix}{table}]")
        allowed = tables[table]
        if allowed is not None:
            for key in value:
                if key not in allowed:
                    check.fail(table, key, "unknown key", check.suggest(key, allowed))


def _parse_runtime(check: Checker, runtime: dict[str, Any]) -> tuple[int, dict[str, Any], str | None, str | None]:
    """[runtime] seed, env, engine and engine-image (engine-environment names a file: read apart)."""
    seed = runtime.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        check.fail("runtime", "seed", f"must be a non-negative integer, not {seed!r}")
    env = _parse_env(check, runtime.get("env", {}))
    engine = runtime.get("engine")
    if engine is not None and (
        not isinstance(engine, str) or not re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.+!-]*", engine)
    ):
        check.fail("runtime", "engine", f"must name an exact version like \"vllm==0.32.0\", not {engine!r}")
    engine_image = runtime.get("engine-image")
    if engine_image is not None and (not isinstance(engine_image, str) or not IMAGE_DIGEST_RE.fullmatch(engine_image)):
        check.fail(
            "runtime", "engine-image", f"{engine_image!r} is not pinned by digest",
            'write it as "registry/repo@sha256:<64 hex>" (a tag can move; a digest cannot)',
        )
    return seed, env, engine, engine_image


def _parse_deterministic(check: Checker, runtime: dict[str, Any]) -> bool:
    deterministic = runtime.get("deterministic", False)
    if not isinstance(deterministic, bool):
        check.fail("runtime", "deterministic", f"must be true or false, not {deterministic!r}")
    return deterministic


def _parse_env(check: Checker, env: Any) -> dict[str, Any]:
    """[runtime] env: variables for the engine. Values are strings, or references to where a
    secret is kept ({ env = "NAME" } / { file = "path" }), read at `up` and never written."""
    if not isinstance(env, dict):
        check.fail("runtime", "env", "must be a table of NAME = \"value\"")
    for name, value in env.items():
        if not VARIABLE_NAME_RE.fullmatch(name):
            check.fail("runtime", "env", f"'{name}' is not an environment variable name")
        if name in OWNED_VARIABLES:
            check.fail("runtime", "env", f"{name} cannot be set here: {OWNED_VARIABLES[name]}", "remove it from env")
        if isinstance(value, dict):
            _parse_reference(check, "runtime", "env", value, f"{name}: ")
            continue
        if not isinstance(value, str):
            check.fail("runtime", "env", f"{name} must be a string, not {value!r}", f'write {name} = "{value}"')
        if names_a_secret(name):
            check.fail(
                "runtime", "env", f"{name} looks like a secret, and a value written here ends up in the lock and in `plan`",
                f'write {name} = {{ env = "{name}" }} (or {{ file = "path" }}) and keep the value there',
            )
        problem = argument_problem(f"{name}={value}")
        if problem:
            check.fail("runtime", "env", f"{name}: the variable {problem}")
    return dict(env)


def _parse_policy(check: Checker, table: dict[str, Any]) -> Policy:
    trust = table.get("trust-remote-code", False)
    # `is`, not `in`: 0 == False, and 0 is not a boolean.
    if trust is not False and trust != "pinned":
        check.fail("policy", "trust-remote-code", f"must be false or \"pinned\", not {trust!r}")
    allow_pickle = table.get("allow-pickle", False)
    if not isinstance(allow_pickle, bool):
        check.fail("policy", "allow-pickle", f"must be true or false, not {allow_pickle!r}")
    return Policy(trust_remote_code=trust, allow_pickle=allow_pickle)


def _parse_engine_environment(check: Checker, file: Any) -> EngineEnvironmentSpec | None:
    if file is None:
        return None
    if not isinstance(file, str) or not file:
        check.fail("runtime", "engine-environment", "must be the path of a constraints file (name==version lines)")
    path = (check.path.parent / os.path.expanduser(file)).resolve()
    try:
        data = path.read_bytes()
    except OSError:
        check.fail(
            "runtime", "engine-environment", f"{file} does not exist or cannot be read",
            "write it with `vdeploy engine freeze FILE` where the engine is installed",
        )
    pins, problem = parse_pins(data)
    if problem is not None:
        raise ManifestError(f"{path}:{problem[0]}: {problem[1]}; engine-environment takes exact pins (name==version), as `vdeploy engine freeze` writes them")
    if not pins:
        check.fail("runtime", "engine-environment", f"{file} pins no package", "write it with `vdeploy engine freeze FILE`")
    return EngineEnvironmentSpec(file_as_written=file, path=path, data=data, pins=pins)


def parse_pins(data: bytes) -> tuple[tuple[tuple[str, str], ...], tuple[int, str] | None]:
    """The exact pins of a pip requirements/constraints file: ((name, version), ...) sorted, or
    the first line that is not one (line number, what is wrong). `--hash=` options are allowed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return (), (1, "not UTF-8 text")
    pins: dict[str, str] = {}
    logical = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not logical:
            start = number
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical = (logical + line).strip()
        if not logical:
            continue
        words = logical.split()
        logical = ""
        match = PIN_RE.fullmatch(words[0])
        if match is None:
            return (), (start, f"{words[0]!r} is not an exact pin")
        for option in words[1:]:
            if not HASH_OPTION_RE.fullmatch(option):
                return (), (start, f"{option!r} is not a --hash=sha256:... option")
        name = re.sub(r"[-_.]+", "-", match.group("name")).lower()
        if pins.get(name, match.group("version")) != match.group("version"):
            return (), (start, f"{name} is pinned twice, to different versions")
        pins[name] = match.group("version")
    return tuple(sorted(pins.items())), None


def _parse_source(check: Checker, role: str, table: dict[str, Any]) -> SourceSpec:
    repo, local, revision, include = (table.get(k) for k in SOURCE_KEYS)
    if repo is not None and local is not None:
        check.fail(role, "path", "both repo and path are set", "keep one: repo for the Hub, path for a local folder")
    if repo is None and local is None:
        check.fail(role, None, f"[{role}] needs repo = \"org/name\" or path = \"./folder\"")
    if repo is not None:
        if not isinstance(repo, str) or not REPO_ID_RE.fullmatch(repo) or "--" in repo or ".." in repo:
            check.fail(role, "repo", f"{repo!r} is not a Hub repo id", "write it as \"org/name\"")
    if local is not None:
        if not isinstance(local, str) or not local:
            check.fail(role, "path", "must be a folder path string")
        if revision is not None:
            check.fail(role, "revision", "a local path has no revision", "remove revision, or use repo = ...")
    if revision is None:
        revision = "main"
    if not isinstance(revision, str):
        check.fail(role, "revision", f"must be a string, not {revision!r}")
    check_revision(check, role, revision)
    if include is None:
        include = []
    if not isinstance(include, list) or not all(isinstance(p, str) and p for p in include):
        check.fail(role, "include", "must be a list of glob patterns like [\"*.json\", \"*.safetensors\"]")
    folder = None
    if local is not None:
        folder = (check.path.parent / os.path.expanduser(local)).resolve()
    return SourceSpec(
        role=role, repo=repo, path=folder, path_as_written=local, revision=revision, include=tuple(include)
    )


def _parse_draft(check: Checker, serve: dict[str, Any]) -> SourceSpec | None:
    """A draft model in speculative-config is a source like the model: locked, stored, verified."""
    config = serve.get("speculative-config")
    if not isinstance(config, dict) or "model" not in config:
        return None
    name, revision = config["model"], config.get("revision", "main")
    if not isinstance(name, str) or not name:
        check.fail("serve", "speculative-config", "model must be a Hub repo id or a folder path")
    if not isinstance(revision, str):
        check.fail("serve", "speculative-config", f"revision must be a string, not {revision!r}")
    if name.startswith((".", "/", "~")):
        if "revision" in config:
            check.fail("serve", "speculative-config", "a local draft folder has no revision", "remove revision")
        folder = (check.path.parent / os.path.expanduser(name)).resolve()
        return SourceSpec(role="draft", path=folder, path_as_written=name)
    if not REPO_ID_RE.fullmatch(name):
        check.fail("serve", "speculative-config", f"model {name!r} is not a Hub repo id or a ./folder path")
    check_revision(check, "serve", revision)
    return SourceSpec(role="draft", repo=name, revision=revision)


def check_revision(check: Checker, role: str, revision: str) -> None:
    if COMMIT_RE.fullmatch(revision):
        return
    if re.fullmatch(r"[0-9a-fA-F]{40}", revision):
        check.fail(role, "revision", f"commit {revision!r} must be lowercase hex", f"write {revision.lower()!r}")
    if re.fullmatch(r"[0-9a-f]{7,39}", revision):
        check.fail(role, "revision", f"{revision!r} looks like an abbreviated commit", "write the full 40-character sha")
    if not revision or BAD_REF_RE.search(revision):
        check.fail(role, "revision", f"{revision!r} is not a branch, tag or 40-hex commit")


def _parse_chat_template(check: Checker, table: dict[str, Any] | None) -> ChatTemplateSpec | None:
    if table is None:
        return None
    file, text = table.get("file"), table.get("text")
    if (file is None) == (text is None):
        check.fail("chat-template", None, "set exactly one of file = \"...jinja\" or text = \"...\"")
    if text is not None:
        if not isinstance(text, str) or not text:
            check.fail("chat-template", "text", "must be a non-empty string")
        return ChatTemplateSpec(data=text.encode(), text=text)
    if not isinstance(file, str) or not file:
        check.fail("chat-template", "file", "must be a file path string")
    resolved = (check.path.parent / os.path.expanduser(file)).resolve()
    try:
        data = resolved.read_bytes()
    except OSError:
        check.fail("chat-template", "file", f"{file} does not exist or cannot be read", f"create it, or fix the path (relative to {check.path.parent})")
    return ChatTemplateSpec(data=data, file=resolved, file_as_written=file)


SECRET_FLAGS = frozenset({"api-key"})


def _parse_serve(check: Checker, table: dict[str, Any]) -> dict[str, Any]:
    serve: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = raw_key.replace("_", "-").lstrip("-")
        if key in OWNED_FLAGS:
            check.fail("serve", raw_key, "is set by vdeploy from the lock", f"use {OWNED_FLAGS[key]} instead")
        if key in serve:
            check.fail("serve", raw_key, f"duplicates '{key}'")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*(\.[a-z0-9-]+)*", key):
            check.fail("serve", raw_key, "is not a flag name", "write flags by their long name, like max-model-len")
        if key in SECRET_FLAGS:
            value = _parse_secret_refs(check, raw_key, value)
        serve[key] = value
    return dict(sorted(serve.items()))


def _parse_secret_refs(check: Checker, key: str, value: Any) -> Any:
    """A secret is only ever named: { env = "VAR" } or { file = "path" }, or a list of one."""
    refs = value if isinstance(value, list) else [value]
    for ref in refs:
        if isinstance(ref, str):
            check.fail(
                "serve", key, "a secret written inline would end up in the lock and in `ps`",
                f'write {key} = {{ env = "VLLM_API_KEY" }} (or {{ file = "path" }}) and keep the key there',
            )
        _parse_reference(check, "serve", key, ref)
    if len(refs) != 1:
        # vLLM reads a single key from VLLM_API_KEY; others would be dropped without a word.
        check.fail(
            "serve", key, f"lists {len(refs)} keys, but the key reaches vLLM through VLLM_API_KEY, which holds one",
            f'keep one reference: {key} = {{ env = "VLLM_API_KEY" }}',
        )
    return value


def _parse_reference(check: Checker, table: str, key: str, ref: Any, label: str = "") -> tuple[str, str]:
    """{ env = "NAME" } or { file = "path" }: where a secret is read from at `up`; (kind, where)."""
    if not isinstance(ref, dict) or len(ref) != 1 or not set(ref) <= {"env", "file"} or not isinstance(next(iter(ref.values())), str):
        check.fail(table, key, f"{label}must be {{ env = \"NAME\" }} or {{ file = \"path\" }}")
    kind, where = next(iter(ref.items()))
    if kind == "env" and not VARIABLE_NAME_RE.fullmatch(where):
        check.fail(table, key, f"{label}{{ env = {where!r} }} does not name an environment variable", 'write { env = "NAME" }')
    if kind == "file" and (not where.strip() or argument_problem(where)):
        check.fail(table, key, f"{label}{{ file = {where!r} }} does not name a file", 'write { file = "path/to/the/secret" }')
    return kind, where


class Checker:
    """Turns a problem into one error line: file:line: [table] key: what; hint.

    The manifest's tables and a lock's [inputs] go through the same checks; for a lock, `prefix`
    ("inputs.") places the table in the lock, `error` is LockError and `advice` says what to do.
    The text for line numbers is read only when there is a problem to report.
    """

    def __init__(
        self, path: Path, text: str | None = None, error: type[VdeployError] = ManifestError,
        prefix: str = "", advice: str | None = None,
    ) -> None:
        self.path = path
        self._text = text
        self.error = error
        self.prefix = prefix
        self.advice = advice

    @property
    def lines(self) -> list[str]:
        if self._text is None:
            try:
                self._text = self.path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                self._text = ""
        return self._text.splitlines()

    def problem(self, table: str | None, key: str | None, what: str, hint: str | None = None) -> VdeployError:
        table = f"{self.prefix}{table}" if table else (self.prefix.rstrip(".") or None)
        hint = "; ".join(h for h in (hint, self.advice) if h) or None
        return self.error(problem_line(self.path, self.lines, table, key, what, hint))

    def fail(self, table: str | None, key: str | None, what: str, hint: str | None = None) -> NoReturn:
        raise self.problem(table, key, what, hint)

    @staticmethod
    def suggest(word: str, choices: Any) -> str | None:
        return did_you_mean(word, choices)


def did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else f"known: {', '.join(sorted(choices))}"


def manifest_problem(
    manifest: Manifest, table: str | None, key: str | None, what: str, hint: str | None = None
) -> ManifestError:
    """A ManifestError about [table] key of a loaded manifest, with the key's line number."""
    return Checker(manifest.path).problem(table, key, what, hint)  # type: ignore[return-value]


def problem_line(
    path: Path, lines: list[str], table: str | None, key: str | None, what: str, hint: str | None
) -> str:
    line = locate(lines, table, key)
    where = f"{path}:{line}" if line else str(path)
    subject = f"[{table}] {key}" if table and key else (f"[{table}]" if table else "")
    message = f"{where}: {subject + ': ' if subject else ''}{what}"
    return message + (f"; {hint}" if hint else "")


def locate(lines: list[str], table: str | None, key: str | None) -> int | None:
    """The 1-based line of [table] key (or of the [table] header), read off the TOML text."""
    current = None
    header_line = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        header = re.match(r"^\[\s*([^\[\]]+?)\s*\](\s*#.*)?$", stripped)
        if header:
            current = header.group(1).strip().strip('"')
            if current == table and header_line is None:
                header_line = number
            continue
        if current is None and key is None and header_line is None:
            # A table written as a root key (`model = "x"`): point at that line.
            assigned = re.match(r'^("?)([^"=]+?)\1\s*=', stripped)
            if assigned and assigned.group(2).strip() == table:
                header_line = number
            continue
        if current != table or key is None:
            continue
        assigned = re.match(r'^("?)([^"=]+?)\1\s*=', stripped)
        if assigned and _kebab(assigned.group(2)) == _kebab(key):
            return number
    return header_line


def _kebab(key: str) -> str:
    return key.strip().strip('"').replace("_", "-").lstrip("-")


# ---- [[check]]: golden prompts ---------------------------------------------------------------

CHECK_KEYS = ("name", "prompt", "messages", "max-tokens", "temperature", "logprobs", "seed")
CHECK_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
CHAT_ROLES = ("system", "user", "assistant")
MAX_CHECK_LOGPROBS = 20  # the OpenAI API's top_logprobs limit, which vLLM's chat endpoint keeps


@dataclass(frozen=True)
class CheckSpec:
    """One [[check]]: a request whose answer `vdeploy check` compares with the golden one."""

    name: str
    prompt: str | None = None  # completions
    messages: tuple[tuple[str, str], ...] | None = None  # chat: (role, content)
    max_tokens: int = 16
    temperature: float = 0.0
    logprobs: int = 1
    seed: int | None = None  # None: [runtime] seed

    @property
    def endpoint(self) -> str:
        return "/v1/completions" if self.prompt is not None else "/v1/chat/completions"


def parse_checks(check: Checker, tables: Any) -> tuple[CheckSpec, ...]:
    """[[check]] tables, each checked; one error line names the check, its key and its line."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ManifestError(f"{check.path}: 'check' must be [[check]] tables, each with name and prompt or messages")
    specs: list[CheckSpec] = []
    for index, table in enumerate(tables):
        def fail(key: str | None, what: str, hint: str | None = None) -> NoReturn:
            raise check_problem(check, index, table, key, what, hint)

        for key in table:
            if key not in CHECK_KEYS:
                fail(key, "unknown key", did_you_mean(key, CHECK_KEYS))
        name = table.get("name")
        if not isinstance(name, str) or not CHECK_NAME_RE.fullmatch(name):
            fail("name", f"{name!r} is not a check name" if name is not None else "missing",
                 'write name = "greeting" (letters, digits, ".", "_", "-")')
        if any(spec.name == name for spec in specs):
            fail("name", f"{name!r} names an earlier check too", "give each check its own name")
        prompt, messages = table.get("prompt"), table.get("messages")
        if (prompt is None) == (messages is None):
            fail(None, "set exactly one of prompt (completions) or messages (chat)")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            fail("prompt", "must be a non-empty string")
        chat = None
        if messages is not None:
            chat = _parse_messages(messages, fail)
        max_tokens = table.get("max-tokens", 16)
        if not _is_int(max_tokens) or max_tokens < 1:
            fail("max-tokens", f"must be a positive integer, not {max_tokens!r}")
        temperature = table.get("temperature", 0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < float("inf"):
            fail("temperature", f"must be a number >= 0, not {temperature!r}")
        logprobs = table.get("logprobs", 1)
        if not _is_int(logprobs) or not 0 <= logprobs <= MAX_CHECK_LOGPROBS:
            fail("logprobs", f"must be an integer from 0 to {MAX_CHECK_LOGPROBS}, not {logprobs!r}")
        seed = table.get("seed")
        if seed is not None and (not _is_int(seed) or seed < 0):
            fail("seed", f"must be a non-negative integer, not {seed!r}", "leave it out to use [runtime] seed")
        specs.append(CheckSpec(
            name=name, prompt=prompt, messages=chat, max_tokens=max_tokens, temperature=float(temperature),
            logprobs=logprobs, seed=seed,
        ))
    return tuple(specs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_messages(messages: Any, fail: Any) -> tuple[tuple[str, str], ...]:
    shape = 'write messages = [{ role = "user", content = "..." }]'
    if not isinstance(messages, list) or not messages:
        fail("messages", "must be a non-empty list of { role, content } tables", shape)
    parsed = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            fail("messages", f"message {number} must be {{ role = \"...\", content = \"...\" }}", shape)
        if message["role"] not in CHAT_ROLES:
            fail("messages", f"message {number}: role {message['role']!r} is not one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            fail("messages", f"message {number}: content must be a string")
        parsed.append((message["role"], message["content"]))
    return tuple(parsed)


def check_problem(
    check: Checker, index: int, table: dict[str, Any], key: str | None, what: str, hint: str | None = None,
) -> ManifestError:
    """file:line: [[check]] NAME key: what; hint. NAME is the check's name, else its position."""
    line = locate_check(check.lines, index, key)
    where = f"{check.path}:{line}" if line else str(check.path)
    name = table.get("name")
    label = repr(name) if isinstance(name, str) and name else f"#{index + 1}"
    subject = f"[[check]] {label}" + (f" {key}" if key else "")
    return ManifestError(f"{where}: {subject}: {what}" + (f"; {hint}" if hint else ""))


def locate_check(lines: list[str], index: int, key: str | None) -> int | None:
    """The 1-based line of key in the index-th [[check]] table (or of its header)."""
    seen = -1
    header = None
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("["):
            if header is not None:
                break
            if re.match(r"^\[\[\s*check\s*\]\]", stripped):
                seen += 1
                if seen == index:
                    header = number
            continue
        if header is not None and key is not None:
            assigned = re.match(r'^("?)([^"=]+?)\1\s*=', stripped)
            if assigned and assigned.group(2).strip() == key:
                return number
    return header
