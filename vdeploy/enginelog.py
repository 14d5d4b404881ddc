"""What vLLM chose where the manifest left it to vLLM, read off the engine's start-up log.

A float32 checkpoint with `dtype` unset runs as bfloat16 on x86 CPUs; batch sizes, the KV cache
and the threads depend on the machine. vLLM says what it chose in its log before it answers
/health; the run record keeps it under `effective`. Pure: log text in, values out. Values keep
vLLM's spelling (`"torch.bfloat16"`), with numbers, booleans and None made JSON.
"""

from __future__ import annotations

import re
from typing import Any

CONFIG_LINE = re.compile(r"Initializing a V1 LLM engine \((?P<version>[^)]*)\) with config: (?P<config>.*)$", re.MULTILINE)
# Keys of the engine's config line worth keeping: each can change outputs or was left to vLLM.
CONFIG_KEYS = (
    "dtype", "max_seq_len", "kv_cache_dtype", "quantization", "enforce_eager", "enable_prefix_caching",
    "enable_chunked_prefill", "tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size",
    "seed", "device_config", "load_format", "tokenizer_mode", "trust_remote_code",
)
# Other lines: (key, pattern with one group, how to read the group).
LINE_VALUES = (
    ("max_num_batched_tokens", re.compile(r"max_num_batched_tokens=(\d+)"), int),
    ("max_model_len", re.compile(r"Using max model len (\d+)"), int),
    ("kv_cache_tokens", re.compile(r"(?:CPU|GPU) KV cache size: ([\d,]+) tokens"), lambda s: int(s.replace(",", ""))),
    ("torch_threads", re.compile(r"Reducing Torch threads from \d+ to (\d+)"), int),
    ("cpu_core_ids", re.compile(r"local_rank=0, core ids=\[([^\]]*)\]"), lambda s: [int(x) for x in s.split(",") if x.strip()]),
    ("attention_backend", re.compile(r"Using (?:AttentionBackendEnum\.)?([A-Z][A-Z0-9_]+) (?:attention )?backend"), str),
    ("sampling_defaults", re.compile(r"overridden by the model's `generation_config.json`: `(\{[^`]*\})`"), str),
)


def split_top_level(text: str) -> list[str]:
    """`a=1, b=X(c=2, d=[3, 4]), e='f, g'` → the three top-level `key=value` items."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "([{<":
            depth += 1
        elif char in ")]}>":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    return [item for item in items if item]


def plain(value: str) -> Any:
    """vLLM's repr of a simple value as JSON: 256, True, None, 'text' → 256, true, null, "text"."""
    if value in ("True", "False"):
        return value == "True"
    if value == "None":
        return None
    if re.fullmatch(r"-?\d+", value):
        return int(value)
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def effective_values(log: str) -> dict[str, Any]:
    """The values vLLM's start-up log reports (first engine's, where several start)."""
    values: dict[str, Any] = {}
    config = CONFIG_LINE.search(log)
    if config:
        values["engine_version"] = config.group("version")
        for item in split_top_level(config.group("config")):
            key, sep, value = item.partition("=")
            if sep and key in CONFIG_KEYS and key not in values:
                values[key] = plain(value)
    for key, pattern, read in LINE_VALUES:
        found = pattern.search(log)
        if found:
            try:
                values[key] = read(found.group(1))
            except ValueError:
                continue
    return values


# A worker starts loading its part of the model only once torch.distributed's groups are formed,
# and every node joins them through node 0 (--master-addr): on a headless node, which answers no
# /health, one of these lines in its own log is the sign it joined. vLLM 0.32 logs the first from
# each CPU worker, the second from the first worker of each GPU node.
JOINED_LINE = re.compile(r"Starting to load model |Model loading took ")


def has_joined(log: str) -> bool:
    """A worker of this engine has joined the deployment's process group (and loaded its part)."""
    return JOINED_LINE.search(log) is not None
