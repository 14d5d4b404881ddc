"""Step 6 of the flow on other machines (export.py), its last part: the documents as text. Deterministic YAML for
JSON-like data, and systemd unit files. Pure: the same data always gives the same bytes.

vdeploy writes its own YAML rather than calling PyYAML: the data is plain (mappings, lists,
strings, numbers, booleans), the output must be byte-stable across library versions for golden
files and `same lock → same bytes`, and vdeploy itself does not depend on PyYAML (vLLM does).
Strings are written plain only where every YAML 1.1 and 1.2 reader takes them as the same string;
otherwise as JSON strings (valid YAML double-quoted scalars), or as literal blocks when they span
lines.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

# Plain only: letters, digits and a few punctuation marks, starting so that no reader can take it
# for a number, a boolean, null, an alias, a tag or a flow collection.
_PLAIN_RE = re.compile(r"(--?)?[A-Za-z_/][A-Za-z0-9_./@+-]*")
_RESERVED_WORDS = frozenset({"y", "n", "yes", "no", "true", "false", "on", "off", "null"})
# What a literal block may hold: printable text without the characters YAML 1.1 treats as line
# breaks (NEL, LS, PS) or a byte-order mark.
_LITERAL_SAFE_RE = re.compile(r"[\t\n\x20-\x7e\xa0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]*")

INDENT = "  "


def yaml_stream(documents: Sequence[Any], header: str = "") -> str:
    """Several documents as one YAML stream (`kubectl apply -f` reads it), each opened by ---."""
    text = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return text + "".join("---\n" + to_yaml(document) for document in documents)


def to_yaml(value: Any) -> str:
    """One document: block style, keys in the order given, sequences flush with their key."""
    if isinstance(value, (Mapping, list, tuple)) and value:
        return "\n".join(_block(value, 0)) + "\n"
    return _inline(value) + "\n"


def _block(value: Mapping[str, Any] | Sequence[Any], depth: int) -> list[str]:
    pad = INDENT * depth
    lines: list[str] = []
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"YAML keys here are strings, not {key!r}")
            lines += _entry(f"{pad}{_scalar(key)}:", item, depth, nested_depth=depth + 1, list_depth=depth)
        return lines
    for item in value:
        if isinstance(item, Mapping) and item:
            inner = _block(item, depth + 1)
            lines.append(f"{pad}- {inner[0][len(pad) + len(INDENT):]}")
            lines += inner[1:]
        else:
            lines += _entry(f"{pad}-", item, depth, nested_depth=depth + 1, list_depth=depth + 1)
    return lines


def _entry(head: str, item: Any, depth: int, nested_depth: int, list_depth: int) -> list[str]:
    """`head` (a key with its colon, or a list dash) followed by item."""
    if isinstance(item, Mapping) and item:
        return [head, *_block(item, nested_depth)]
    if isinstance(item, (list, tuple)) and item:
        return [head, *_block(item, list_depth)]
    if isinstance(item, str) and _literal_ok(item):
        # Chomping: "-" strips a missing final newline, "" keeps one, "+" keeps several.
        chomp = "+" if item.endswith("\n\n") else ("" if item.endswith("\n") else "-")
        body = item[:-1] if item.endswith("\n") else item
        pad = INDENT * (depth + 1)
        return [f"{head} |{chomp}", *(f"{pad}{line}" if line else "" for line in body.split("\n"))]
    return [f"{head} {_inline(item)}"]


def _literal_ok(text: str) -> bool:
    if "\n" not in text or not text.strip("\n") or text[0] in " \n":
        return False
    if any(line != line.rstrip(" \t") for line in text.split("\n")):
        return False
    return _LITERAL_SAFE_RE.fullmatch(text) is not None


def _inline(value: Any) -> str:
    if isinstance(value, Mapping):
        if value:
            raise TypeError("a non-empty mapping is written as a block")
        return "{}"
    if isinstance(value, (list, tuple)):
        if value:
            raise TypeError("a non-empty list is written as a block")
        return "[]"
    return _scalar(value)


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"{value!r} has no portable YAML form")
        return repr(value)
    if not isinstance(value, str):
        raise TypeError(f"cannot write {type(value).__name__} as YAML")
    if _PLAIN_RE.fullmatch(value) and value.lower() not in _RESERVED_WORDS:
        return value
    # JSON's escapes are a subset of YAML's double-quoted ones; ASCII keeps line separators escaped.
    return json.dumps(value, ensure_ascii=True)


# ---- systemd units ---------------------------------------------------------------------------

_SYSTEMD_WORD_RE = re.compile(r"[A-Za-z0-9_./:=+,@-]+")


def systemd_word(arg: str) -> str:
    """One argument of an Exec*= line, quoted so systemd splits and unescapes it back to arg.

    systemd expands $VAR and %-specifiers in command lines, so both are doubled; anything but a
    plain word is double-quoted with C escapes (systemd.service(5), "Command lines").
    """
    if _SYSTEMD_WORD_RE.fullmatch(arg):
        return arg
    escaped = arg.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
    return '"' + escaped.replace("$", "$$").replace("%", "%%") + '"'


def systemd_command(argv: Sequence[str]) -> str:
    return " ".join(systemd_word(arg) for arg in argv)


def systemd_split(line: str) -> list[str]:
    """The argv systemd makes of a command line as systemd_command writes them: words split on
    blanks outside double quotes, C escapes undone, then $$ and %% made single."""
    escapes = {"n": "\n", "t": "\t"}
    words: list[str] = []
    current: list[str] = []
    in_word = quoted = False
    i = 0
    while i < len(line):
        char = line[i]
        if char == "\\" and i + 1 < len(line):
            current.append(escapes.get(line[i + 1], line[i + 1]))
            in_word = True
            i += 2
            continue
        if char == '"':
            quoted = not quoted
            in_word = True
        elif char in " \t" and not quoted:
            if in_word:
                words.append("".join(current))
                current, in_word = [], False
        else:
            current.append(char)
            in_word = True
        i += 1
    if in_word:
        words.append("".join(current))
    return [word.replace("$$", "$").replace("%%", "%") for word in words]


def systemd_environment(name: str, value: str) -> str:
    """The value of one Environment= assignment: quoted, with %-specifiers doubled ($ is literal there)."""
    escaped = f"{name}={value}".replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("%", "%%") + '"'


def systemd_unit(sections: Sequence[tuple[str, Sequence[tuple[str, str]]]], header: str = "") -> str:
    """A unit file: a comment header, then [Section] blocks of Key=value lines in the order given."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for name, entries in sections:
        if lines:
            lines.append("")
        lines.append(f"[{name}]")
        lines += [f"{key}={value}" for key, value in entries]
    return "\n".join(lines) + "\n"
