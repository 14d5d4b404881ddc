"""Which inputs can change what the server answers: the classification tables `vdeploy diff`
(and `lock --update`) use to say, of each difference, whether it changes outputs, is
operational, or is unknown (treated as changing outputs). Pure data and lookups.

Sources: ../shared/notes/determinism.md, section 5, and the flags of vLLM 0.32. The operational
serve flags start from `manifest.OPERATIONAL_FLAGS` (the ones kept out of the deployment id);
the few added here change only how the server is reached, logged or measured, but are in the id.
"""

from __future__ import annotations

from vdeploy.changes import Effect
from vdeploy.manifest import OPERATIONAL_FLAGS

# Serve flags that change the tokens (or logprobs) the server returns: numerics, batching and
# scheduling (which change the batch a request's logits are computed in), the model as loaded,
# decoding and parsing of outputs.
OUTPUT_FLAGS = frozenset({
    # numerics and the model as loaded
    "dtype", "quantization", "quantization-config", "kv-cache-dtype", "kv-cache-dtype-skip-layers",
    "hf-overrides", "hf-config-path", "model-impl", "load-format", "convert", "runner",
    "model-class-overrides", "max-model-len", "disable-sliding-window", "disable-cascade-attn",
    "mamba-cache-dtype", "mamba-ssm-cache-dtype", "lora-dtype", "linear-backend", "moe-backend",
    "kernel-config", "attention-backend", "attention-config", "use-fp64-gumbel", "performance-mode",
    # batching, caching and scheduling
    "block-size", "max-num-batched-tokens", "max-num-seqs", "enable-chunked-prefill",
    "enable-prefix-caching", "long-prefill-token-threshold", "scheduling-policy", "async-scheduling",
    "gpu-memory-utilization", "kv-cache-memory-bytes", "num-gpu-blocks-override", "cpu-offload-gb",
    "enable-batch-sharded-sampling", "kv-sharing-fast-prefill",
    # parallelism and compilation
    "tensor-parallel-size", "pipeline-parallel-size", "data-parallel-size",
    "decode-context-parallel-size", "prefill-context-parallel-size", "enable-expert-parallel",
    "enforce-eager", "compilation-config", "optimization-level", "cudagraph-capture-sizes",
    "max-cudagraph-capture-size",
    # decoding
    "speculative-config", "spec-method", "spec-model", "spec-tokens", "logprobs-mode", "max-logprobs",
    "generation-config", "override-generation-config", "logits-processors", "watermark",
    "watermark-config", "structured-outputs-config", "return-tokens-as-token-ids",
    # adapters
    "enable-lora", "lora-modules", "max-lora-rank", "max-loras", "default-mm-loras",
    # prompt and answer shaping
    "tokenizer-mode", "skip-tokenizer-init", "default-chat-template-kwargs",
    "chat-template-content-format", "reasoning-parser", "reasoning-config", "tool-call-parser",
    "enable-auto-tool-choice", "response-role", "mm-processor-kwargs", "limit-mm-per-prompt",
    "pooler-config",
})

# How the server is reached, logged, traced or measured; never what it answers.
OPERATIONAL_SERVE_FLAGS = OPERATIONAL_FLAGS | frozenset({
    "served-model-name", "log-level", "logging-config", "log-config-file", "log-error-stack",
    "enable-log-deltas", "aggregate-engine-logging", "enable-logging-iteration-details",
    "collect-detailed-traces", "otlp-traces-endpoint", "disable-access-log-for-endpoints",
    "enable-request-id-headers", "enable-server-load-tracking", "show-hidden-metrics-for-version",
    "kv-cache-metrics", "kv-cache-metrics-sample", "cudagraph-metrics", "enable-mfu-metrics",
    "enable-per-request-metrics", "per-request-spec-decode-metrics", "custom-histogram-buckets",
    "enable-offline-docs", "ssl-ciphers", "h11-max-header-count", "h11-max-incomplete-event-size",
    "sse-keep-alive-interval", "shutdown-timeout", "use-tqdm-on-load", "max-parallel-loading-workers",
    "distributed-timeout-seconds", "cpu-distributed-timeout-seconds", "profiler-config",
})


def flag_effect(name: str) -> Effect:
    """Whether a serve flag (long name, kebab-case) can change answers."""
    flag = name.split(".")[0]
    if flag in OPERATIONAL_SERVE_FLAGS:
        return Effect.OPERATIONAL
    if flag in OUTPUT_FLAGS:
        return Effect.OUTPUTS
    return Effect.UNKNOWN


# Environment variables, by name then by prefix (determinism.md, section 5: to be safe, all
# VLLM_*, TORCH*, TRITON_*, OMP_* and KMP_* change outputs, and the math libraries' too).
OPERATIONAL_VARIABLES = frozenset({
    "VLLM_LOGGING_LEVEL", "VLLM_CONFIGURE_LOGGING", "VLLM_LOGGING_CONFIG_PATH", "VLLM_LOGGING_PREFIX",
    "VLLM_LOG_STATS_INTERVAL", "VLLM_NO_USAGE_STATS", "VLLM_DO_NOT_TRACK", "VLLM_USAGE_STATS_SERVER",
    "VLLM_API_KEY", "VLLM_HOST_IP", "VLLM_PORT", "VLLM_HTTP_TIMEOUT_KEEP_ALIVE",
    "VLLM_ENGINE_READY_TIMEOUT_S", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE",
    "TOKENIZERS_PARALLELISM", "XDG_CACHE_HOME",
})
OUTPUT_VARIABLE_PREFIXES = (
    "VLLM_", "TORCH", "PYTORCH_", "TRITON_", "OMP_", "KMP_", "MKL_", "CUDA_", "NCCL_", "CUBLAS",
    "CUDNN_", "ONEDNN_", "DNNL_",
)
OUTPUT_VARIABLES = frozenset({"LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONHASHSEED"})
OPERATIONAL_VARIABLE_PREFIXES = ("HF_", "HUGGINGFACE_", "HUGGING_FACE_")


def env_effect(name: str) -> Effect:
    """Whether an environment variable of the engine can change answers."""
    if name in OPERATIONAL_VARIABLES:
        return Effect.OPERATIONAL
    if name in OUTPUT_VARIABLES or name.startswith(OUTPUT_VARIABLE_PREFIXES):
        return Effect.OUTPUTS
    if name.startswith(OPERATIONAL_VARIABLE_PREFIXES):
        return Effect.OPERATIONAL
    return Effect.UNKNOWN
