"""The engine probe: the installed vLLM's serve-flag catalogue, read off its own parser in a
subprocess (importing vLLM takes seconds) and cached per engine distribution and version.

The only module besides launch.py that starts a process; flags.py, which checks and renders
[serve] against a catalogue, stays pure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from vdeploy.atomic import write_atomically
from vdeploy.constants import vdeploy_cache_dir
from vdeploy.engine import installed_engine
from vdeploy.errors import EngineError
from vdeploy.flags import CATALOGUE_FORMAT, Catalogue

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def probe_catalogue(python: str) -> Catalogue:
    """Ask the vLLM installed for `python` for its serve flags (seconds: it imports vLLM)."""
    answer = _run_probe(python, ["catalogue"])
    return Catalogue.from_json({"format": CATALOGUE_FORMAT, **answer})


def load_catalogue(engine_spec: str, python: str = sys.executable, build: bool = True) -> Catalogue | None:
    """The catalogue of engine_spec ("vllm==0.32.0") from the cache, probing `python` on a miss.

    With build=False a miss gives None at once, so `vdeploy plan` never waits for vLLM.
    """
    wanted = _normalise_engine(engine_spec)
    cached = _read_cached(_cache_file(wanted), wanted)
    if cached is not None or not build:
        return cached
    catalogue = probe_catalogue(python)
    probed = _normalise_engine(catalogue.engine)
    # worth keeping even when it is not the one asked for
    text = json.dumps(catalogue.to_json(), indent=1, sort_keys=True) + "\n"
    write_atomically(_cache_file(probed), text.encode())
    if probed != wanted:
        raise EngineError(
            f"{python} runs {catalogue.engine}, not {engine_spec}; "
            "install that engine here, or lock where it is installed"
        )
    return catalogue


def _cache_file(engine: str) -> Path:
    """flags/<distribution>-<version>.json in the cache folder."""
    return vdeploy_cache_dir() / "flags" / f"{engine.replace('==', '-')}.json"


def _normalise_engine(spec: str) -> str:
    distribution, _, version = spec.partition("==")
    return f"{re.sub(r'[-_.]+', '-', distribution).lower()}=={version}"


def _read_cached(path: Path, engine: str) -> Catalogue | None:
    # The cache is derived data: a missing, unreadable or older-format file is simply rebuilt.
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != CATALOGUE_FORMAT:
        return None
    if _normalise_engine(str(data.get("engine", ""))) != engine:
        return None
    return Catalogue.from_json(data)


def parse_engine_argv(python: str, argv: list[str]) -> dict[str, Any]:
    """Have the engine's serve parser read argv (model first), without launching anything.

    Returns the parsed namespace (dest → JSON-able value) after vLLM's own pre-launch checks.
    """
    answer = _run_probe(python, ["parse", *argv])
    if "error" in answer:
        raise EngineError(f"vLLM's serve parser refuses these flags: {answer['error']}")
    return answer["namespace"]


def parse_engine_argvs(python: str, argvs: list[list[str]]) -> list[dict[str, Any]]:
    """parse_engine_argv for several argvs, importing vLLM once (seconds) for all of them."""
    answers = _run_probe(python, ["parse-many", json.dumps(argvs)])["answers"]
    for argv, answer in zip(argvs, answers):
        if "error" in answer:
            raise EngineError(f"vLLM's serve parser refuses {' '.join(argv)[:200]}: {answer['error']}")
    return [answer["namespace"] for answer in answers]


def _run_probe(python: str, arguments: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    # flagprobe may run in another interpreter than ours: let it find this package.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(PACKAGE_ROOT), env.get("PYTHONPATH"))))
    command = [python, "-m", "vdeploy.flagprobe", *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 and "VLLM_TARGET_DEVICE" not in env:
            # A CUDA build of vLLM on a machine without a GPU builds its parser only as the CPU target.
            done = subprocess.run(command, capture_output=True, text=True, env={**env, "VLLM_TARGET_DEVICE": "cpu"})
    except OSError as exc:
        raise EngineError(f"{python}: cannot run it to read vLLM's serve flags ({exc.strerror})") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineError(
            f"{python}: cannot read vLLM's serve flags ({last}); "
            "is vLLM installed for this Python? (pip install 'vdeploy[engine]')"
        )
    return json.loads(done.stdout)


def installed_catalogue() -> Catalogue:
    """The installed engine's flag catalogue; a clear error where no engine is installed."""
    running = installed_engine()
    if running is None:
        raise EngineError("no vLLM is installed here, so its flags cannot be read; install the engine (README: Install)")
    return load_catalogue(running.spec)
