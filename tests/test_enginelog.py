"""Effective values read off vLLM's start-up log (issue 10): what vLLM chose where the manifest left it."""

from __future__ import annotations

from vdeploy.enginelog import effective_values, split_top_level

# vLLM 0.32.0 (CPU build) starting a float32 checkpoint with dtype left unset: the lines that say
# what it chose, verbatim (store path shortened), among the others it prints.
CPU_LOG = """\
(APIServer pid=15693) INFO 12-01 15:07:36 [api_utils.py:286] non-default args: {'port': 18777, 'model': '/store/snap', 'max_model_len': 256, 'enforce_eager': True, 'max_num_seqs': 4}
(APIServer pid=15693) INFO 12-01 15:07:36 [model.py:733] Resolved architecture: LlamaForCausalLM
(APIServer pid=15693) INFO 12-01 15:07:36 [model.py:2495] Downcasting torch.float32 to torch.bfloat16.
(APIServer pid=15693) INFO 12-01 15:07:36 [model.py:2152] Using max model len 256
(APIServer pid=15693) INFO 12-01 15:07:37 [scheduler.py:307] Chunked prefill is enabled with max_num_batched_tokens=1024.
(EngineCore pid=16271) INFO 12-01 15:07:55 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: model='/store/snap', speculative_config=None, tokenizer='/store/snap', skip_tokenizer_init=False, tokenizer_mode=auto, revision=None, tokenizer_revision=None, trust_remote_code=False, dtype=torch.bfloat16, max_seq_len=256, download_dir=None, load_format=auto, tensor_parallel_size=1, pipeline_parallel_size=1, data_parallel_size=1, decode_context_parallel_size=1, dcp_comm_backend=ag_rs, disable_custom_all_reduce=True, quantization=None, quantization_config=None, enforce_eager=True, aux_output_config=AuxOutputConfig(enable_return_routed_experts=False, max_bytes=None), kv_cache_dtype=auto, device_config=cpu, structured_outputs_config=StructuredOutputsConfig(backend='auto', disable_any_whitespace=False, disable_additional_properties=False, reasoning_parser='', reasoning_parser_plugin='', enable_in_reasoning=False), observability_config=ObservabilityConfig(show_hidden_metrics_for_version=None, otlp_traces_endpoint=None, collect_detailed_traces=None, per_request_spec_decode_metrics='none', kv_cache_metrics=False, kv_cache_metrics_sample=0.01, custom_histogram_buckets=None, cudagraph_metrics=False, enable_layerwise_nvtx_tracing=False, enable_mfu_metrics=False, enable_mm_processor_stats=False, enable_logging_iteration_details=False, jit_monitor_mode='warn', jit_monitor_verbose=False), seed=0, served_model_name=/store/snap, enable_prefix_caching=True, enable_chunked_prefill=True, pooler_config=None, compilation_config={'mode': <CompilationMode.NONE: 0>, 'debug_dump_path': None, 'cache_dir': '', 'compile_cache_save_format': 'binary', 'backend': 'inductor', 'custom_ops': ['all'], 'ir_enable_torch_wrap': False, 'splitting_ops': [], 'compile_mm_encoder': False, 'cudagraph_mm_encoder': False, 'encoder_cudagraph_token_budgets': [], 'encoder_cudagraph_max_vision_items_per_batch': 0, 'encoder_cudagraph_max_frames_per_batch': None, 'cudagraph_decoder_replay': True, 'decoder_replay_cudagraph_capture_sizes': [], 'decoder_replay_trim_threshold': 768, 'compile_sizes': None, 'compile_ranges_endpoints': [1024], 'inductor_compile_config': {'enable_auto_functionalized_v2': False}, 'inductor_passes': {}, 'cudagraph_mode': <CUDAGraphMode.NONE: 0>, 'cudagraph_num_of_warmups': 0, 'cudagraph_capture_sizes': [], 'cudagraph_copy_inputs': False, 'cudagraph_specialize_lora': True, 'use_inductor_graph_partition': False, 'pass_config': {'fuse_norm_quant': True, 'fuse_act_quant': True, 'fuse_attn_quant': False, 'fuse_allreduce_rms': False, 'enable_qk_norm_rope_fusion': False, 'fuse_rope_kvcache_cat_mla': False, 'fuse_act_padding': False, 'fuse_qk_norm_rope_kvcache': False}, 'max_cudagraph_capture_size': None, 'dynamic_
(EngineCore pid=16271) INFO 12-01 15:07:56 [ompmultiprocessing.py:185] 	local_rank=0, core ids=[0]
(EngineCore pid=16271) INFO 12-01 15:08:34 [torch_utils.py:295] Reducing Torch threads from 2 to 1 for serving. Set OMP_NUM_THREADS in the external environment to override.
(EngineCore pid=16271) INFO 12-01 15:08:34 [kv_cache_utils.py:2327] CPU KV cache size: 2,097,152 tokens, Maximum concurrency for 256 tokens per request: 8192.00x
(APIServer pid=15693) WARNING 12-01 15:08:40 [model.py:1893] Default vLLM sampling parameters have been overridden by the model's `generation_config.json`: `{'temperature': 0.7, 'top_p': 0.9}`. If this is not intended, please relaunch vLLM instance with `--generation-config vllm`.
(APIServer pid=15693) INFO 12-01 15:08:40 [entry.py:140] Starting vLLM server on http://0.0.0.0:18777
"""

# What a CUDA build says about the choices a CPU build does not make.
GPU_LINES = """\
(EngineCore_DP0 pid=812) INFO 05-02 10:11:12 [cuda.py:507] Using FLASH_ATTN attention backend out of potential backends: ['FLASH_ATTN', 'FLASHINFER', 'TRITON_ATTN'].
(EngineCore_DP0 pid=812) INFO 05-02 10:11:40 [kv_cache_utils.py:2327] GPU KV cache size: 1,234,560 tokens, Maximum concurrency for 32,768 tokens per request: 37.68x
"""


def test_cpu_start_up_log_gives_the_dtype_vllm_chose_and_the_machine_dependent_sizes():
    values = effective_values(CPU_LOG)
    assert values["dtype"] == "torch.bfloat16"  # the float32 checkpoint, downcast
    assert values["engine_version"] == "v0.32.0"
    assert (values["max_seq_len"], values["max_model_len"], values["max_num_batched_tokens"]) == (256, 256, 1024)
    assert values["kv_cache_tokens"] == 2097152
    assert (values["torch_threads"], values["cpu_core_ids"]) == (1, [0])
    assert values["enforce_eager"] is True and values["trust_remote_code"] is False
    assert values["enable_prefix_caching"] is True and values["enable_chunked_prefill"] is True
    assert values["quantization"] is None and values["kv_cache_dtype"] == "auto"
    assert values["device_config"] == "cpu" and values["seed"] == 0
    assert values["sampling_defaults"] == "{'temperature': 0.7, 'top_p': 0.9}"
    # nested configs are not flattened into values
    assert "compilation_config" not in values and "model" not in values


def test_gpu_lines_give_the_attention_backend_and_kv_cache():
    values = effective_values(GPU_LINES)
    assert values == {"attention_backend": "FLASH_ATTN", "kv_cache_tokens": 1234560}
    assert effective_values("INFO [cuda.py:446] Using AttentionBackendEnum.FLASHINFER backend.") == {
        "attention_backend": "FLASHINFER"}


def test_a_log_without_the_start_up_lines_gives_nothing():
    assert effective_values("") == {}
    assert effective_values("Traceback (most recent call last):\nValueError: max_model_len too large\n") == {}


def test_config_items_split_at_top_level_commas_only():
    text = "a=1, b=X(c=2, d=[3, 4]), e='f, g', h={'i': (5, 6)}, j=<E.K: 0>"
    assert split_top_level(text) == ["a=1", "b=X(c=2, d=[3, 4])", "e='f, g'", "h={'i': (5, 6)}", "j=<E.K: 0>"]
