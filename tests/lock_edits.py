"""Locks edited as an attacker would: tables changed, then the hashes recomputed as
lockfiles/FORMAT.md documents them, so only the checks of the contents themselves can object."""

from __future__ import annotations

import hashlib
import re
import tomllib
from typing import Any, Callable

import tomli_w

from vdeploy.lockfile import LOCK_VERSION
from vdeploy.manifest import OPERATIONAL_FLAGS, canonical_json


def documented_deployment_id(data: dict[str, Any]) -> str:
    """The deployment id as lockfiles/FORMAT.md defines it, computed from the lock's own tables."""
    sources = [dict(data[role], role=role) for role in ("model", "tokenizer", "draft") if role in data]
    sources += [dict(entry, role="code") for entry in data.get("code", [])]
    engine = data["engine"]
    pins = dict(engine.get("environment", {}).get("pins", {}))
    pins[re.sub(r"[-_.]+", "-", engine["distribution"]).lower()] = engine["version"]
    pinned = {
        "format": LOCK_VERSION,
        "sources": [
            {"role": s["role"], "repo": s.get("repo"), "commit": s["commit"],
             "files": [[f["path"], f["sha256"]] for f in s["files"]]}
            for s in sources
        ],
        "chat-template": data.get("chat-template", {}).get("sha256"),
        "engine": [engine["distribution"], engine["version"], sorted(pins.items()), engine.get("image")],
        "serve": {k: v for k, v in data["serve"].items() if k not in OPERATIONAL_FLAGS},
        "seed": data["runtime"]["seed"],
        "env": data["runtime"].get("env", {}),
        "policy": data["inputs"]["policy"],
    }
    return hashlib.sha256(canonical_json(pinned)).hexdigest()


def edited_lock(text: str, change: Callable[[dict[str, Any]], None], rehash: bool = True) -> str:
    """The lock TOML `text` with `change` applied to its tables; with rehash, `manifest` and
    `deployment` recomputed to match."""
    data = tomllib.loads(text)
    change(data)
    if rehash:
        data["manifest"] = hashlib.sha256(canonical_json(data["inputs"])).hexdigest()
        data["deployment"] = documented_deployment_id(data)
    return tomli_w.dumps(data)
