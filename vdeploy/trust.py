"""Step 2, for code: every place a source can run code when loaded, and the policy on it. Pure.

Code runs through transformers' `auto_map` (in config.json, tokenizer_config.json and the
processor configs; an entry `other/repo--module.Class` loads code from ANOTHER repo), and
through pickle weights, which execute code when unpickled.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

CODE_CONFIGS = (
    "config.json",
    "tokenizer_config.json",
    "processor_config.json",
    "preprocessor_config.json",
    "image_processor_config.json",
    "video_preprocessor_config.json",
    "feature_extractor_config.json",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
SAFE_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
CROSS_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)--(?P<rest>.+)$")


@dataclass(frozen=True)
class AutoMapEntry:
    config: str  # the file it is in, e.g. "config.json"
    key: str  # e.g. "AutoModelForCausalLM"
    target: str  # as written, e.g. "modeling_x.XModel" or "other/repo--modeling_x.XModel"

    @property
    def repo(self) -> str | None:
        """The other repo the code comes from, or None for this repo."""
        match = CROSS_REPO_RE.match(self.target)
        return match.group("repo") if match else None

    @property
    def module_file(self) -> str:
        """The Python file the class lives in: "modeling_x.XModel" → "modeling_x.py"."""
        match = CROSS_REPO_RE.match(self.target)
        reference = match.group("rest") if match else self.target
        return reference.rsplit(".", 1)[0].replace(".", "/") + ".py"

    def describe(self) -> str:
        return f"{self.config} auto_map.{self.key} = {self.target!r}"


@dataclass(frozen=True)
class CodeReport:
    python_files: tuple[str, ...]
    auto_map: tuple[AutoMapEntry, ...]

    @property
    def needs_remote_code(self) -> bool:
        return bool(self.auto_map)

    @property
    def other_repos(self) -> tuple[str, ...]:
        return tuple(sorted({e.repo for e in self.auto_map if e.repo is not None}))


def auto_map_entries(config: str, text: bytes) -> list[AutoMapEntry]:
    """The auto_map entries of one config file (a value may be a list: slow and fast tokenizer)."""
    try:
        data = json.loads(text)
    except ValueError:
        return []
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    if not isinstance(auto_map, dict):
        return []
    entries = []
    for key, value in sorted(auto_map.items()):
        for target in value if isinstance(value, list) else [value]:
            if isinstance(target, str) and target:
                entries.append(AutoMapEntry(config=config, key=key, target=target))
    return entries


def find_code(paths: list[str], configs: Mapping[str, bytes]) -> CodeReport:
    """Where code can come from, given a source's file list and the bytes of its code configs."""
    entries = []
    for name in CODE_CONFIGS:
        if name in configs:
            entries.extend(auto_map_entries(name, configs[name]))
    return CodeReport(
        python_files=tuple(sorted(p for p in paths if p.endswith(".py"))),
        auto_map=tuple(entries),
    )


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def drop_pickles_beside_safetensors(paths: list[str]) -> tuple[list[str], list[str]]:
    """(kept, dropped): where safetensors weights exist, pickle weights are not locked at all."""
    if not any(p.lower().endswith(SAFE_WEIGHT_SUFFIXES) for p in paths):
        return list(paths), []
    kept = [p for p in paths if not is_pickle(p)]
    return kept, [p for p in paths if is_pickle(p)]
