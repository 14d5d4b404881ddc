"""Step 7 of the flow: the golden answers (vdeploy.golden.json) and their comparison with new ones.

The golden file is canonical JSON meant to be committed beside the lock, keyed by deployment id,
then hardware class, then check name; each check keeps its request, its text, its token ids, each
token's text and each token's logprob. Every deployment id also keeps the lock it was recorded
from, so a later `check` under another id can say what differs (`diff`'s summary of two locks)
without the old lock at hand. Pure: no HTTP, no engine; `check.py` asks and calls these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vdeploy.errors import CheckError

GOLDEN_NAME = "vdeploy.golden.json"
GOLDEN_FORMAT = 1
SAME, DRIFTED, CHANGED, UNRECORDED = "same", "drifted", "request changed", "not recorded"
SHOWN_CHARACTERS = 60  # of each text, from the first differing token


@dataclass(frozen=True)
class Answer:
    """What the server answered to one check."""

    text: str
    tokens: tuple[int, ...]
    token_texts: tuple[str, ...]
    logprobs: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "tokens": list(self.tokens), "token_texts": list(self.token_texts),
                "logprobs": list(self.logprobs)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Answer:
        return cls(str(data["text"]), tuple(int(t) for t in data["tokens"]),
                   tuple(str(t) for t in data["token_texts"]), tuple(float(p) for p in data["logprobs"]))

    def text_from(self, index: int) -> str:
        """The text from token `index` on (joined token texts; the whole text from 0)."""
        return self.text if index == 0 else "".join(self.token_texts[index:])


@dataclass(frozen=True)
class Recorded:
    """One check's golden entry: the request sent and the answer it got."""

    request: dict[str, Any]
    answer: Answer

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request, **self.answer.to_json()}


@dataclass(frozen=True)
class Entry:
    """The golden answers of one deployment on one hardware class."""

    deployment: str
    hardware: str
    checks: Mapping[str, Recorded]


@dataclass(frozen=True)
class Golden:
    """The whole golden file: deployment id → its lock (as lock_to_data gives it) and, by hardware
    class, its checks."""

    deployments: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def entry(self, deployment: str, hardware: str) -> Entry | None:
        classes = self.deployments.get(deployment, {}).get("hardware", {})
        if hardware not in classes:
            return None
        return Entry(deployment, hardware, _checks(classes[hardware]["checks"]))

    def classes(self, deployment: str) -> list[str]:
        return sorted(self.deployments.get(deployment, {}).get("hardware", {}))

    def lock_data(self, deployment: str) -> dict[str, Any] | None:
        return self.deployments.get(deployment, {}).get("lock")

    def with_entry(self, deployment: str, hardware: str, lock_data: Mapping[str, Any],
                   checks: Mapping[str, Recorded]) -> Golden:
        """This file with one deployment's answers on one class replaced (other entries kept)."""
        deployments = json.loads(json.dumps(self.deployments))
        entry = deployments.setdefault(deployment, {"hardware": {}})
        entry["lock"] = json.loads(json.dumps(lock_data))
        entry["hardware"][hardware] = {"checks": {name: recorded.to_json() for name, recorded in checks.items()}}
        return Golden(deployments)

    def dumps(self) -> str:
        data = {"format": GOLDEN_FORMAT, "deployments": self.deployments}
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"


def _checks(data: Mapping[str, Any]) -> dict[str, Recorded]:
    return {name: Recorded(dict(value["request"]), Answer.from_json(value)) for name, value in data.items()}


def read_golden(path: Path) -> Golden:
    """The golden file, checked enough that a hand edit gone wrong is one line, not a traceback."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise CheckError(f"{path}: no golden answers yet; record them with `vdeploy check --record`") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckError(f"{path}: not readable JSON ({exc}); fix it, or record again with `vdeploy check --record`") from None
    if not isinstance(data, dict) or data.get("format") != GOLDEN_FORMAT or not isinstance(data.get("deployments"), dict):
        raise CheckError(f"{path}: not a golden file of format {GOLDEN_FORMAT}; record again with `vdeploy check --record`")
    golden = Golden(data["deployments"])
    for deployment in golden.deployments:
        for hardware in golden.classes(deployment):
            try:
                golden.entry(deployment, hardware)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise CheckError(
                    f"{path}: deployment {deployment[:16]} on {hardware} is missing or mistypes {exc}; "
                    "fix it, or record again with `vdeploy check --record`"
                ) from None
    return golden


def write_golden(path: Path, golden: Golden) -> None:
    from vdeploy.atomic import default_mode, write_atomically

    write_atomically(path, golden.dumps().encode(), mode=default_mode())


# ---- comparison ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    """One check's answer against its golden one."""

    name: str
    state: str  # SAME, DRIFTED, CHANGED (the request is not the recorded one), UNRECORDED
    first_difference: int | None = None  # the first token index that differs
    golden_text: str | None = None  # from the first differing token
    text: str | None = None
    largest_difference: float | None = None  # of the logprobs of the tokens both answers share

    @property
    def same(self) -> bool:
        return self.state == SAME

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "state": self.state, "first_difference": self.first_difference,
            "golden_text": self.golden_text, "text": self.text, "largest_difference": self.largest_difference,
        }

    def describe(self) -> str:
        if self.state == SAME:
            extra = "" if not self.largest_difference else f" (largest logprob difference {self.largest_difference:.3g})"
            return f"same     {self.name}{extra}"
        if self.state == DRIFTED:
            largest = "n/a" if self.largest_difference is None else f"{self.largest_difference:.3g}"
            where = (f"from token {self.first_difference}: golden {_shown(self.golden_text)}, now {_shown(self.text)}"
                     if self.first_difference is not None else "tokens identical")
            return f"drifted  {self.name}: {where}; largest logprob difference {largest}"
        if self.state == CHANGED:
            return f"changed  {self.name}: its request is not the recorded one; record again with `vdeploy check --record`"
        return f"new      {self.name}: no golden answer; record it with `vdeploy check --record`"


def _shown(text: str | None) -> str:
    if text is None:
        return "''"
    return repr(text if len(text) <= SHOWN_CHARACTERS else text[:SHOWN_CHARACTERS] + "…")


def first_difference(golden: Sequence[int], tokens: Sequence[int]) -> int | None:
    """The first index where two token sequences differ (a shorter one differs where it ends)."""
    for index, (a, b) in enumerate(zip(golden, tokens)):
        if a != b:
            return index
    return None if len(golden) == len(tokens) else min(len(golden), len(tokens))


def largest_difference(golden: Answer, answer: Answer) -> float | None:
    """The largest |Δ logprob| over the tokens both answers share, up to the first difference."""
    end = first_difference(golden.tokens, answer.tokens)
    shared = min(len(golden.logprobs), len(answer.logprobs), end if end is not None else len(golden.tokens))
    if shared == 0:
        return None
    return max(_gap(a, b) for a, b in zip(golden.logprobs[:shared], answer.logprobs[:shared]))


def _gap(a: float, b: float) -> float:
    if a == b:
        return 0.0
    gap = abs(a - b)
    return math.inf if math.isnan(gap) else gap


def compare_answer(name: str, recorded: Recorded | None, request: Mapping[str, Any], answer: Answer,
                   tolerance: float, ignored: Sequence[str] = ()) -> Verdict:
    """`same` when the tokens are identical and every logprob is within tolerance (0: bit-identical).
    The request must be the recorded one, but for the `ignored` keys."""
    if recorded is None:
        return Verdict(name, UNRECORDED)
    if canonical(_without(recorded.request, ignored)) != canonical(_without(request, ignored)):
        return Verdict(name, CHANGED)
    golden = recorded.answer
    index = first_difference(golden.tokens, answer.tokens)
    largest = largest_difference(golden, answer)
    if index is None and (largest is None or largest <= tolerance):
        return Verdict(name, SAME, largest_difference=largest)
    if index is None:
        return Verdict(name, DRIFTED, largest_difference=largest)
    return Verdict(name, DRIFTED, index, golden.text_from(index), answer.text_from(index), largest)


def _without(request: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    return {k: v for k, v in request.items() if k not in keys}


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ---- lone against batched ------------------------------------------------------------------


@dataclass(frozen=True)
class LoadReport:
    """`--concurrency N`: each check answered in company, against its lone answer."""

    concurrency: int
    answers: int  # batched answers compared
    largest_difference: float | None  # over all of them
    drifted: tuple[str, ...]  # checks whose tokens changed in company

    def to_json(self) -> dict[str, Any]:
        return {"concurrency": self.concurrency, "answers": self.answers,
                "largest_difference": self.largest_difference, "drifted": list(self.drifted)}

    def describe(self) -> str:
        largest = "n/a" if self.largest_difference is None else repr(self.largest_difference)
        tokens = (f"tokens changed for {', '.join(self.drifted)}" if self.drifted else "tokens identical")
        return (f"under load ({self.answers} answers, {self.concurrency} at a time): largest logprob difference "
                f"from the lone answers {largest}; {tokens}")


def load_report(concurrency: int, lone: Mapping[str, Answer], batched: Sequence[tuple[str, Answer]]) -> LoadReport:
    largest: float | None = None
    drifted: list[str] = []
    for name, answer in batched:
        if first_difference(lone[name].tokens, answer.tokens) is not None and name not in drifted:
            drifted.append(name)
        gap = largest_difference(lone[name], answer)
        if gap is not None:
            largest = gap if largest is None else max(largest, gap)
    return LoadReport(concurrency, len(batched), largest, tuple(drifted))
