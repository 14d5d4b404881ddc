"""Step 2, shared by Hub and local sources: which of a source's files the lock pins, and whether
the [policy] lets what they would run run. Pure.

A file is pinned when its name is safe to place in a snapshot folder, `include` matches it, and
it is not a pickle beside safetensors weights. The policy then looks at what the chosen files can
run: pickles, and remote code through auto_map.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from vdeploy.errors import PolicyError, SourceError
from vdeploy.lockfile import LockedSource
from vdeploy.manifest import Policy
from vdeploy.safety import case_collisions, path_problem
from vdeploy.trust import drop_pickles_beside_safetensors, is_pickle


def is_included(path: str, include: tuple[str, ...]) -> bool:
    return not include or any(fnmatch.fnmatchcase(path, pattern) for pattern in include)


def select_files(where: str, paths: Iterable[str], include: tuple[str, ...]) -> list[str]:
    """The paths of a source that the lock pins, sorted; `where` names the source in errors."""
    chosen = sorted(p for p in paths if is_included(p, include))
    for path in chosen:
        problem = path_problem(path)
        if problem:
            raise SourceError(f"{where}: file name {path!r} {problem}; refusing this source (leave it out with include)")
    if len(set(chosen)) != len(chosen):
        twice = next(p for p in chosen if chosen.count(p) > 1)
        raise SourceError(f"{where}: lists {twice!r} twice; refusing this source")
    clashes = case_collisions(chosen)
    if clashes:
        a, b = clashes[0]
        raise SourceError(f"{where}: {a!r} and {b!r} differ only in case and would collide; leave one out with include")
    if not chosen:
        raise SourceError(f"{where}: no files{' match include' if include else ''}")
    kept, _ = drop_pickles_beside_safetensors(chosen)
    return kept


def loads_pickles(serve: Mapping[str, Any]) -> bool:
    """Whether [serve] has vLLM unpickle the weights (load-format "pt"), which runs code."""
    return str(serve.get("load-format", "")).lower() == "pt"


def source_label(source: LockedSource) -> str:
    return f"[{source.role}] {source.repo or source.path}" + (f"@{source.commit[:12]}" if source.repo else "")


def check_code_policy(policy: Policy, source: LockedSource) -> None:
    """Nothing runs that the lock does not pin and the policy does not allow."""
    pickles = [f.path for f in source.files if is_pickle(f.path)]
    if pickles and not policy.allow_pickle:
        raise PolicyError(
            f"{source_label(source)}: pickle weights run code when loaded ({', '.join(pickles[:3])}); "
            "use a revision with safetensors, or set [policy] allow-pickle = true if you trust them"
        )
    if not source.auto_map:
        return
    entries = "; ".join(e.describe() for e in source.auto_map[:3])
    if not policy.trust_remote_code:
        files = ", ".join(f.path for f in source.code_files[:3]) or "no .py files here"
        raise PolicyError(
            f"{source_label(source)}: needs remote code ({entries}; code: {files}); "
            'to pin it and allow it to run, set [policy] trust-remote-code = "pinned"'
        )
    paths = {f.path for f in source.files}
    for entry in source.auto_map:
        if entry.repo is None and entry.module_file not in paths:
            raise PolicyError(
                f"{source_label(source)}: {entry.describe()} needs {entry.module_file}, which is not in the source; "
                f"the repo lacks it, or [{source.role}] include leaves it out"
            )
