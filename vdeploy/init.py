"""Before step 1 of the flow: `vdeploy init --from-command`, an existing `vllm serve ...` command
line turned into a manifest (vdeploy.toml) that `plan` renders back to the same flags.

Pure: the engine's flag catalogue says how each word of the command is read (short aliases,
--x/--no-x, lists, JSON); nothing is looked up on disk or on the Hub.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path, PurePath
from typing import Any

import tomli_w

from vdeploy.constants import API_KEY_VARIABLE, MANIFEST_NAME, OWNED_VARIABLES, names_a_secret
from vdeploy.errors import ManifestError, VdeployError
from vdeploy.flags import Catalogue, FlagSpec, check_serve
from vdeploy.manifest import REPO_ID_RE, Checker, parse_manifest
from vdeploy.selection import loads_pickles

# Checks are operational (no relock needed to add one); `vdeploy check` asks them.
EXAMPLE_CHECK = """
# A golden prompt: `vdeploy check --record` keeps its answer (token ids, logprobs) in
# vdeploy.golden.json; `vdeploy check` then proves the deployment still answers it the same.
[[check]]
name = "hello"
prompt = "Hello, my name is"
max-tokens = 16
"""

ENV_ASSIGNMENT_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", re.DOTALL)


def init_manifest(
    folder: Path, from_command: str | None, repo: str | None, engine: str | None, force: bool,
) -> Path:
    """Write FOLDER/vdeploy.toml from a command line or as a starter for a repo, after checking it
    the way `lock` checks a manifest before it asks the Hub; the path written."""
    if folder.exists() and not folder.is_dir():
        raise ManifestError(f"{folder}: not a folder; give the folder to write {MANIFEST_NAME} in")
    target = folder / MANIFEST_NAME
    if target.exists() and not force:
        raise ManifestError(f"{target}: already exists; pass --force to overwrite it")
    catalogue = None
    if from_command is not None:
        from vdeploy.probe import installed_catalogue

        catalogue = installed_catalogue()
        text = manifest_from_command(from_command, catalogue, engine or catalogue.engine)
    elif repo is not None and REPO_ID_RE.fullmatch(repo):
        engine = engine or _installed_engine_spec()
        text = f'[model]\nrepo = "{repo}"\nrevision = "main"\n\n[serve]\n\n[runtime]\nseed = 0\nengine = "{engine}"\n'
    else:
        raise ManifestError("init needs --from-command \"vllm serve ...\" or --repo org/name")
    text = text.rstrip("\n") + "\n" + EXAMPLE_CHECK
    try:
        check_manifest_text(text, target, catalogue)
    except VdeployError as exc:
        raise ManifestError(f"nothing written: the manifest would not lock: {exc}") from None
    folder.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    return target


def _installed_engine_spec() -> str:
    from vdeploy.engine import installed_engine

    installed = installed_engine()
    if installed is None:
        raise ManifestError("no vLLM is installed here to name as [runtime] engine; pass --engine vllm==<version>")
    return installed.spec


def check_manifest_text(text: str, path: Path, catalogue: Catalogue | None) -> None:
    """What `lock` checks of a manifest before it asks the Hub: its tables, [serve] against the
    engine's flags, the policy on pickle loading, and that local folders are folders."""
    import tomllib

    manifest = parse_manifest(tomllib.loads(text), path, text)
    check = Checker(path, text)
    serve, _ = check_serve(manifest.serve, catalogue, check)
    if loads_pickles(serve) and not manifest.policy.allow_pickle:
        check.fail("serve", "load-format", '"pt" loads pickle weights', "set [policy] allow-pickle = true if you trust them")
    for source in manifest.sources:
        if source.is_local and not source.path.is_dir():  # type: ignore[union-attr]
            table, key = ("serve", "speculative-config") if source.role == "draft" else (source.role, "path")
            check.fail(table, key, f"{source.path} is not a folder", f"write the path relative to {path.parent}")


def manifest_from_command(command: str, catalogue: Catalogue, engine: str | None = None) -> str:
    """The manifest text for a `vllm serve MODEL ...` or `python -m vllm.entrypoints...` command;
    `engine` ("vllm==0.32.0") is written as [runtime] engine."""
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise ManifestError(f"cannot split the command into words ({exc}); check its quotes") from None
    env, words = _leading_env(words)
    positional, values = _read_flags(_serve_arguments(words, command), catalogue)
    notes: list[str] = []

    model = positional[0] if positional else values.pop("model", None)
    if model is None:
        raise ManifestError("the command names no model; write it after `vllm serve` or as --model")
    if len(positional) > 1:
        raise ManifestError(f"the command has stray words {positional[1:]}; only the model goes before the flags")
    values.pop("model", None)  # vLLM lets the positional model win over --model

    manifest: dict[str, Any] = {"model": _source(model, values.pop("revision", None), notes)}
    if "tokenizer" in values:
        manifest["tokenizer"] = _source(values.pop("tokenizer"), values.pop("tokenizer-revision", None), notes)
    if values.pop("tokenizer-revision", None) is not None:
        notes.append("--tokenizer-revision dropped: without --tokenizer there is no separate tokenizer to pin")
    if values.pop("code-revision", None) is not None:
        notes.append("--code-revision dropped: vdeploy pins remote code with [model] revision")
    if "chat-template" in values:
        template = values.pop("chat-template")
        # vLLM takes the template itself or a path to it; Jinja markup means the former.
        manifest["chat-template"] = {"text": template} if re.search(r"\{[{%]", template) else {"file": template}
    if values.pop("hf-token", None) is not None:
        notes.append("--hf-token dropped: `vdeploy fetch` reads HF_TOKEN and the engine runs offline")
    seed = values.pop("seed", None)
    download_dir = values.pop("download-dir", None)
    trust_remote_code = values.pop("trust-remote-code", False)
    if values.pop("api-key", None) is not None or API_KEY_VARIABLE in env:
        env.pop(API_KEY_VARIABLE, None)
        values["api-key"] = {"env": API_KEY_VARIABLE}
        notes.append(f"The API key is read from ${API_KEY_VARIABLE}: export it before `vdeploy up`.")

    if values:
        manifest["serve"] = dict(sorted(values.items()))
    runtime: dict[str, Any] = {}
    if seed is not None:
        runtime["seed"] = seed
    for name in [n for n in env if n in OWNED_VARIABLES]:
        del env[name]
        notes.append(f"{name} dropped: {OWNED_VARIABLES[name]}.")
    for name in [n for n in env if names_a_secret(n)]:
        del env[name]
        notes.append(f"{name} was set on the command line: export it in the shell that runs vdeploy.")
    if env:
        runtime["env"] = env
    # The engine whose flags read the command (or the one asked for): the lock pins it, and `up`
    # refuses another.
    runtime["engine"] = engine or catalogue.engine
    manifest["runtime"] = runtime
    if trust_remote_code:
        manifest["policy"] = {"trust-remote-code": "pinned"}
    if download_dir is not None:
        manifest["store"] = {"download-dir": download_dir}

    try:
        text = tomli_w.dumps(manifest)
    except TypeError:  # a JSON null somewhere: TOML has no way to write it
        raise ManifestError("a JSON value in the command holds null, which TOML cannot write; drop that key") from None
    header = ["# Written by `vdeploy init` from a vLLM command line.", *(f"# {note}" for note in notes)]
    return "\n".join(header) + "\n\n" + text


def _leading_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """`NAME=value NAME2=value2 vllm serve ...`: the variables, and the command after them."""
    env: dict[str, str] = {}
    while words and (match := ENV_ASSIGNMENT_RE.fullmatch(words[0])):
        env[match.group(1)] = match.group(2)
        words = words[1:]
    return env, words


def _serve_arguments(words: list[str], command: str) -> list[str]:
    """The words after the program: `vllm serve ...` or `python -m vllm.<module> [serve] ...`."""
    if len(words) >= 2 and PurePath(words[0]).name == "vllm" and words[1] == "serve":
        return words[2:]
    if len(words) >= 3 and PurePath(words[0]).name.startswith("python") and words[1] == "-m" and words[2].startswith("vllm"):
        rest = words[3:]
        return rest[1:] if rest[:1] == ["serve"] else rest
    raise ManifestError(
        f"not a vLLM server command: {command[:80]!r}; "
        "give `vllm serve MODEL ...` or `python -m vllm.entrypoints.openai.api_server --model MODEL ...`"
    )


def _read_flags(arguments: list[str], catalogue: Catalogue) -> tuple[list[str], dict[str, Any]]:
    """Positional words and flag values (long name → TOML value), read the way vLLM reads them."""
    positional: list[str] = []
    values: dict[str, Any] = {}
    dotted: dict[str, dict[str, Any]] = {}
    index = 0
    while index < len(arguments):
        word = arguments[index]
        index += 1
        if not _is_option(word):
            positional.append(word)
            continue
        option, has_inline, inline = word.partition("=")
        if option.startswith("--"):
            option = "--" + option[2:].replace("_", "-")  # vLLM takes --max_model_len too
        if re.fullmatch(r"-O\d", word):  # vLLM's -O3 shorthand
            option, has_inline, inline = "--optimization-level", "=", word[2:]
        if "." in option:
            # --compilation-config.mode 3: vLLM merges these into one JSON table per flag.
            if not has_inline:
                inline, index = _next_word(arguments, index, option)
            base, *path = option.lstrip("-").split(".")
            _set_nested(dotted.setdefault(_long_name(f"--{base}", catalogue), {}), path, _json_or_text(inline))
            continue
        spec = catalogue.flags[_long_name(option, catalogue)]
        if spec.kind in ("bool", "store_true", "store_false"):
            values[spec.name] = not spec.negates(option)
        elif spec.kind == "list":
            items = [inline] if has_inline else []  # --x=a takes just a, as in argparse
            while not has_inline and index < len(arguments) and not _is_option(arguments[index]):
                items.append(arguments[index])
                index += 1
            values[spec.name] = [_typed(spec, item, option) for item in items]
        elif spec.nargs == "?" and not has_inline and (index >= len(arguments) or _is_option(arguments[index])):
            values[spec.name] = True
        else:
            if not has_inline:
                inline, index = _next_word(arguments, index, option)
            value = _typed(spec, inline, option)
            values[spec.name] = [*values.get(spec.name, []), value] if spec.kind == "append" else value
    # As in vLLM, the dotted form replaces the JSON form of the same flag.
    values.update(dotted)
    return positional, values


def _is_option(word: str) -> bool:
    # "-1" is a value (max-model-len -1), not an option.
    return word.startswith("-") and not re.fullmatch(r"-\d+(\.\d+)?", word)


def _next_word(arguments: list[str], index: int, option: str) -> tuple[str, int]:
    if index >= len(arguments):
        raise ManifestError(f"{option} at the end of the command has no value")
    return arguments[index], index + 1


def _long_name(option: str, catalogue: Catalogue) -> str:
    name = catalogue.aliases.get(option)
    if name is None:
        raise ManifestError(f"{option} is not a flag of {catalogue.engine}; check the command against `vdeploy flags`")
    return name


def _typed(spec: FlagSpec, text: str, option: str) -> Any:
    """A word of the command as the TOML value the manifest writes for it."""
    try:
        if spec.kind == "json":
            if spec.type_name == "json|str" and not text.lstrip().startswith("{"):
                return text
            return json.loads(text)
        if spec.kind == "size":
            # Sizes keep their words ("32K", "auto"); plain numbers become TOML integers.
            return int(text) if re.fullmatch(r"-?\d+", text) else text
        if spec.type_name == "int":
            return int(text)
        if spec.type_name == "float":
            return int(text) if re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        raise ManifestError(f"{option} {text!r}: not a valid {spec.type_name} value") from None
    return text


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _set_nested(table: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        table = table.setdefault(key, {})
    table[path[-1]] = value


def _source(word: str, revision: str | None, notes: list[str]) -> dict[str, Any]:
    """[model] / [tokenizer]: a Hub repo id, or a local folder when the word looks like a path."""
    looks_local = word.startswith(("/", ".", "~")) or word.count("/") > 1 or not REPO_ID_RE.fullmatch(word)
    if looks_local:
        if revision is not None:
            notes.append(f"--revision {revision} dropped: {word} is a local folder")
        return {"path": word}
    return {"repo": word, "revision": revision} if revision is not None else {"repo": word}
