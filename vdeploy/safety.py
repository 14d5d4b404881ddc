"""Checks on names that come from outside (a Hub tree, a local folder) before they touch the disk,
and on values before they reach a process's arguments or environment."""

from __future__ import annotations

import re
import unicodedata

from vdeploy.constants import MAX_ARGUMENT_BYTES

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def path_problem(path: str) -> str | None:
    """Why a repo file name is unsafe to place in a snapshot folder, or None if it is fine."""
    if not path:
        return "is empty"
    if _CONTROL.search(path):
        return "contains a control character"
    if "\\" in path:
        return "contains a backslash"
    if path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        return "is absolute"
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return "has an empty, '.' or '..' component"
    return None


# What path_problem refuses, over many paths at once ("\n"-joined): a lock's thousand file names
# in two regex passes instead of a thousand calls (fast verify reads every lock).
_ANY_BAD_CHARACTER = re.compile(r"[\x00-\x1f\x7f\\]")
_ANY_BAD_COMPONENT = re.compile(r"^/|^[A-Za-z]:|(?:^|/)\.{0,2}(?:/|$)", re.MULTILINE)


def first_path_problem(paths: list[str]) -> tuple[str, str] | None:
    """The first of many paths that path_problem refuses, and why; None if all are fine."""
    if all(type(path) is str for path in paths) and not (
        _ANY_BAD_CHARACTER.search("".join(paths)) or _ANY_BAD_COMPONENT.search("\n".join(paths))
    ):
        return None
    for path in paths:
        problem = path_problem(path) if isinstance(path, str) else "is not a string"
        if problem:
            return path, problem
    return None


def case_collisions(paths: list[str]) -> list[tuple[str, str]]:
    """Pairs of names that would be one file on a case-insensitive filesystem."""
    seen: dict[str, str] = {}
    clashes = []
    for path in sorted(paths):
        folded = unicodedata.normalize("NFC", path).casefold()
        if folded in seen:
            clashes.append((seen[folded], path))
        else:
            seen[folded] = path
    return clashes


def argument_problem(text: str) -> str | None:
    """Why text cannot be one argument or NAME=value of a process, or None if it can."""
    if "\0" in text:
        return "contains a NUL byte, which no argument or environment variable can carry"
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_ARGUMENT_BYTES:
        return f"is {size} bytes, more than Linux passes to a process in one argument or variable (128 KiB)"
    return None
