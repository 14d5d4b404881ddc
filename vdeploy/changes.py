"""Differences as data: what changed between two versions of a deployment's inputs, and whether
it can change what the server answers. Pure.

Staleness (manifest against lock), engine drift (lock against the installed engine), sources
moved and code changed by `lock --update`, and `vdeploy diff` all return Changes; one renderer
prints them, and `to_json` gives them to `--json`.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


HASH_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


class Effect(str, enum.Enum):
    """Whether a change can change answers. Unknown is treated as changing them."""

    OUTPUTS = "changes outputs"
    OPERATIONAL = "operational"
    UNKNOWN = "unknown"

    @property
    def changes_outputs(self) -> bool:
        return self is not Effect.OPERATIONAL


@dataclass(frozen=True)
class Change:
    """One difference: `what` (a dotted name or a file), its old and new value (None: absent)."""

    group: str  # what kind of input: "manifest", "engine", "source", "code", "weights", "serve", ...
    what: str
    old: Any
    new: Any
    effect: Effect = Effect.UNKNOWN
    detail: str | None = None  # a longer explanation (a text diff), shown under the line
    shown: tuple[str | None, str | None] | None = None  # how old and new read, when short() would not do

    @property
    def changes_outputs(self) -> bool:
        return self.effect.changes_outputs

    def describe(self) -> str:
        if self.old is None:
            return f"{self.what} added" + ("" if self.new in (True, None) else f": {self._shown(1)}")
        if self.new is None:
            return f"{self.what} removed" + ("" if self.old is True else f" (was {self._shown(0)})")
        return f"{self.what} changed: {self._shown(0)} → {self._shown(1)}"

    def _shown(self, side: int) -> str:
        if self.shown is not None and self.shown[side] is not None:
            return str(self.shown[side])
        return short((self.old, self.new)[side])

    def to_json(self) -> dict[str, Any]:
        data = {
            "group": self.group,
            "what": self.what,
            "old": self.old,
            "new": self.new,
            "effect": self.effect.name.lower(),
            "changes_outputs": self.changes_outputs,
        }
        if self.detail is not None:
            data["detail"] = self.detail
        return data


def short(value: Any, width: int = 40) -> str:
    """A value in a few words: hashes by their first 12 digits, other strings as they are,
    anything else as compact JSON."""
    if isinstance(value, str) and HASH_RE.fullmatch(value):
        return value[:12]
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def summarise(changes: Iterable[Change], limit: int = 3) -> str:
    """Changes on one line, for an error message: the first few, then how many more."""
    changes = list(changes)
    shown = "; ".join(c.describe() for c in changes[:limit])
    return shown + (f" (+{len(changes) - limit} more)" if len(changes) > limit else "")


def render_changes(changes: Iterable[Change], indent: str = "  ") -> list[str]:
    """The lines a person reads: one per change, with its detail indented below it."""
    lines = []
    for change in changes:
        lines.append(f"{indent}{change.describe()}")
        if change.detail:
            lines += [f"{indent}  {line}" for line in change.detail.splitlines()]
    return lines


def mapping_changes(
    old: Mapping[str, Any], new: Mapping[str, Any], group: str, prefix: str = "",
    effect_of=lambda name: Effect.UNKNOWN,
) -> list[Change]:
    """Key by key differences of two nested tables, named by their dotted path."""
    changes = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}.{key}" if prefix else str(key)
        before, after = old.get(key), new.get(key)
        if isinstance(before, Mapping) and isinstance(after, Mapping):
            changes += mapping_changes(before, after, group, name, effect_of)
        elif before != after:
            changes.append(Change(group, name, before, after, effect_of(name)))
    return changes
