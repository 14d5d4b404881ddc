"""The names, paths and patterns every step shares, in one place."""

from __future__ import annotations

import os
import re
import sys
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
# The same words where no letter follows (HF_TOKEN, APIKEY, DB_PASSWORD2, AWS_SECRET_ACCESS_KEY):
# what [runtime] env refuses to hold inline. TOKENIZERS_PARALLELISM, a setting, may be written.
SECRET_WORD_RE = re.compile(rf"(?:{SECRET_NAME_RE.pattern})S?(?![A-Z])", re.IGNORECASE)
REDACTED = "<redacted>"

# vLLM's batch-invariant mode ([runtime] deterministic); it has no command-line flag.
BATCH_INVARIANT_VARIABLE = "VLLM_BATCH_INVARIANT"

# The variables vdeploy sets for the engine itself, and what sets them; [runtime] env may not.
OWNED_VARIABLES = {
    "HF_HUB_OFFLINE": "vdeploy always runs the engine offline, from the store",
    "TRANSFORMERS_OFFLINE": "vdeploy always runs the engine offline, from the store",
    "HF_HUB_CACHE": "[store] download-dir",
    "HUGGINGFACE_HUB_CACHE": "[store] download-dir (huggingface_hub still reads this old name)",
    "TRANSFORMERS_CACHE": "[store] download-dir (transformers still reads this old name)",
    "HF_HOME": "[store] download-dir (and HF_TOKEN in the shell that runs lock and fetch)",
    API_KEY_VARIABLE: '[serve] api-key = { env = "NAME" } or { file = "path" }',
    BATCH_INVARIANT_VARIABLE: "[runtime] deterministic = true (which also checks the engine and hardware support it)",
}

# Linux refuses to start a process with any one argument or NAME=value longer than this
# (MAX_ARG_STRLEN, 32 pages); such a value would fail at launch instead of at load.
MAX_ARGUMENT_BYTES = 128 * 1024 - 1


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
    """Whether a variable name may hold a secret (for redaction: errs on the side of hiding)."""
    return SECRET_NAME_RE.search(name) is not None


def names_a_secret(name: str) -> bool:
    """Whether a variable name says it holds a secret (HF_TOKEN, OPENAI_API_KEY, DB_PASSWORD...)."""
    return SECRET_WORD_RE.search(name) is not None


def to_stderr(line: str) -> None:
    """Where a step's progress lines go when its caller gives no `say`: standard error, so that
    standard output stays the command's result."""
    print(line, file=sys.stderr)
