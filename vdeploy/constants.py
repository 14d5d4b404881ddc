"""The names, paths and patterns every step shares, in one place."""

from __future__ import annotations

import os
import re
from pathlib import Path

MANIFEST_NAME = "vdeploy.toml"
LOCK_NAME = "vdeploy.lock"
# Beside the manifest: what vdeploy did here (run records and their logs).
PROJECT_STATE_DIR = ".vdeploy"
RUNS_DIR = f"{PROJECT_STATE_DIR}/runs"

# The variable vLLM reads its API key from: keeps the key out of argv and `ps`.
API_KEY_VARIABLE = "VLLM_API_KEY"

# Names that hold secrets: never printed, written to a lock or kept in a record.
SECRET_NAME_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
REDACTED = "<redacted>"


def default_hf_cache() -> Path:
    """The Hugging Face hub cache, found the way huggingface_hub finds it (without importing it)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser().resolve()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return (Path(home).expanduser() / "hub").resolve()


def vdeploy_cache_dir() -> Path:
    """vdeploy's own cache (engine flag catalogues, parsed locks): $VDEPLOY_CACHE_DIR, else the XDG cache."""
    if os.environ.get("VDEPLOY_CACHE_DIR"):
        return Path(os.environ["VDEPLOY_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")).expanduser() / "vdeploy"


def is_secret_name(name: str) -> bool:
    return SECRET_NAME_RE.search(name) is not None
