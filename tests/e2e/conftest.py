"""End-to-end fixtures: the tiny model on the fake Hub (the real vLLM runs in the tests)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from needs import ENGINE_REASON

ROOT = Path(__file__).resolve().parents[2]
TINY_REPO = "tiny/llama"


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """The tiny Llama, built by the example's deterministic script."""
    # find_spec, not import: importing vLLM here would change this process's environment
    if importlib.util.find_spec("vllm") is None:
        pytest.skip(ENGINE_REASON)
    sys.path.insert(0, str(ROOT / "examples" / "tiny"))
    from build_model import build_model

    folder = tmp_path_factory.mktemp("tiny-model")
    build_model(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_repo(fake_hub, tiny_model) -> str:
    """The tiny model pushed to the fake Hub as one commit on main."""
    files = {p.name: p.read_bytes() for p in sorted(tiny_model.iterdir())}
    fake_hub.commit(TINY_REPO, files)
    return TINY_REPO


@pytest.fixture(scope="session")
def answers_of_fresh_launches() -> dict[str, list]:
    """What a fresh launch answered to engine_support.complete_three, by deployment id: a later test
    of the same deployment compares its own launch with them instead of launching the original again."""
    return {}
