"""Deterministic mode ([runtime] deterministic): whether the engine and hardware here can run vLLM's
batch-invariant mode, so `up`, `run` and `check` refuse, in one line, where they cannot.

The conditions are those of shared/notes/determinism.md: VLLM_BATCH_INVARIANT=1 on CUDA GPUs of
compute capability 8.0 or more, with an attention backend that declares batch invariance. The CPU
build ignores the mode on its platform but swaps softmax, log_softmax, mean and bmm for Triton
kernels, and its Triton has no CPU backend: every request would fail. Pure: facts in, a problem out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

MIN_COMPUTE_CAPABILITY = (8, 0)
# The attention backends that declare batch invariance in vLLM 0.32.
INVARIANT_BACKENDS = ("FLASH_ATTN", "TRITON_ATTN", "FLEX_ATTENTION", "FLASHATTN_MLA", "TRITON_MLA")
WHERE_IT_RUNS = f"it runs on CUDA GPUs of compute capability {MIN_COMPUTE_CAPABILITY[0]}.{MIN_COMPUTE_CAPABILITY[1]} or more"


def batch_invariance_problem(
    distribution: str | None, gpus: Sequence[Mapping[str, Any]], serve: Mapping[str, Any],
) -> str | None:
    """Why batch-invariant mode cannot run with this engine distribution, these visible GPUs (the
    hardware section's `gpus`) and [serve]; None when it can."""
    if distribution is not None and distribution.endswith("-cpu"):
        return (f"the installed engine is {distribution}, the CPU build, whose batch-invariant kernels need Triton, "
                f"which it lacks; {WHERE_IT_RUNS}")
    if not gpus:
        return f"no CUDA GPU is visible here; {WHERE_IT_RUNS}"
    for gpu in gpus:
        capability = _capability(gpu.get("compute_capability"))
        if capability is None or capability < MIN_COMPUTE_CAPABILITY:
            return f"GPU {gpu.get('index', '?')} ({gpu.get('name', '?')}) has compute capability {gpu.get('compute_capability')}; {WHERE_IT_RUNS}"
    backend = serve.get("attention-backend")
    if backend is not None and str(backend).upper() not in INVARIANT_BACKENDS:
        return f"[serve] attention-backend {backend} is not batch-invariant; use one of {', '.join(INVARIANT_BACKENDS)} or leave it out"
    return None


def _capability(value: Any) -> tuple[int, int] | None:
    try:
        major, _, minor = str(value).partition(".")
        return int(major), int(minor or 0)
    except ValueError:
        return None
