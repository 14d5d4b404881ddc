"""What a test needs beyond `pip install -e '.[test]'`, and the one reason it skips with where that is absent.

The core suite (a laptop that only locks) runs without vLLM: tests that launch or probe the engine,
or load a model with the libraries that come with it (transformers, tokenizers, jinja2), skip with
ENGINE_REASON; tests that read the project's shared folder beside the repository skip with a reason
naming the file. Everything else a test needs is in the repository.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vdeploy.engine import installed_engine

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

ENGINE_REASON = "needs the vLLM engine: run scripts/setup"
HAS_ENGINE = installed_engine() is not None
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason=ENGINE_REASON)


def require_engine() -> None:
    """Skip the calling test or fixture where no vLLM is installed."""
    if not HAS_ENGINE:
        pytest.skip(ENGINE_REASON)


def engine_module(name: str):
    """Import a library the engine brings (transformers, tokenizers, jinja2), or skip."""
    return pytest.importorskip(name, reason=ENGINE_REASON)


def shared_file(relative: str) -> Path:
    """A file of the project's shared folder (../shared beside the repository), or skip."""
    path = SHARED / relative
    if not path.is_file():
        pytest.skip(f"needs {path} (the project's shared folder, beside the repository), which is absent here")
    return path
