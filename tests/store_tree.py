"""What a store holds for vLLM and huggingface_hub, comparable between two stores."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def tree(store: Path) -> dict[str, tuple]:
    """Repos and chat templates (not lock files, fingerprints or vdeploy's records): each link's
    target, each file's bytes and mode, each folder."""
    found: dict[str, tuple] = {}
    for path in sorted(store.rglob("*")):
        relative = path.relative_to(store).as_posix()
        if not relative.startswith(("models--", ".locks/vdeploy/chat-templates")):
            continue
        if path.is_symlink():
            found[relative] = ("link", os.readlink(path))
        elif path.is_dir():
            found[relative] = ("folder",)
        else:
            found[relative] = ("file", path.read_bytes(), stat.S_IMODE(path.stat().st_mode))
    return found
