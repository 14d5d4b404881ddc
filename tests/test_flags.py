"""Tests for vdeploy/flags.py and vdeploy/init.py: the serve-flag catalogue read off the installed
vLLM, [serve] checked and rendered, examples/all-flags accepted by the real parser, and
`init --from-command` giving back the flags it was given.

The catalogue is probed once per session (about 10 s: it imports vLLM in a subprocess); two more
subprocesses have the real parser read argv. Everything else is pure and fast.
"""

from __future__ import annotations

import re
import sys
import tomllib
import time
from pathlib import Path

import pytest

from vdeploy.engine import installed_engine
from vdeploy.errors import EngineError, ManifestError, VdeployError
from vdeploy.flags import NO_ENGINE, check_serve, parse_size, render_serve
from vdeploy.probe import load_catalogue, parse_engine_argv
from vdeploy.init import manifest_from_command
from vdeploy.manifest import OWNED_FLAGS, load_manifest

ROOT = Path(__file__).resolve().parents[1]
ALL_FLAGS = ROOT / "examples" / "all-flags" / "vdeploy.toml"
# The project's seed document lives in shared/, beside the repository (also in CI).
SEED = ROOT.parent / "shared" / "seed" / "seed-en.md"
HEAD = '[model]\nrepo = "Qwen/Qwen3-0.6B"\n\n[serve]\n'  # [serve] keys start on line 5

pytestmark = pytest.mark.skipif(installed_engine() is None, reason="needs vLLM installed")


@pytest.fixture(scope="session")
def cache_dir(vdeploy_cache):
    # The session's cache (conftest.py), so CLI tests find the catalogue probed here.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VDEPLOY_CACHE_DIR", str(vdeploy_cache))
        yield vdeploy_cache


@pytest.fixture(scope="session")
def catalogue(cache_dir):
    return load_catalogue(installed_engine().spec, sys.executable)


def write_manifest(folder: Path, serve_lines: str):
    (folder / "vdeploy.toml").write_text(HEAD + serve_lines)
    return load_manifest(folder)


# ---- the catalogue -----------------------------------------------------------------------------


def test_catalogue_reads_the_installed_parser(catalogue):
    assert catalogue.engine == installed_engine().spec
    assert len(catalogue.flags) > 300
    assert catalogue.aliases["-tp"] == "tensor-parallel-size"
    assert catalogue.aliases["--no-enforce-eager"] == "enforce-eager"
    assert catalogue.flags["max-model-len"].kind == "size"
    assert catalogue.flags["max-model-len"].type_name == "size|auto"
    assert set(catalogue.flags["dtype"].choices) == {"auto", "half", "float16", "bfloat16", "float", "float32"}
    assert catalogue.flags["enforce-eager"].kind == "bool"
    assert catalogue.flags["speculative-config"].kind == "json"
    assert catalogue.flags["served-model-name"].kind == "list"
    assert catalogue.flags["tensor-parallel-size"].default == 1
    assert re.fullmatch(r"[0-9a-f]{64}", catalogue.digest)


def test_catalogue_is_cached_per_engine(catalogue, cache_dir, monkeypatch, tmp_path):
    cached_file = cache_dir / "flags" / f"{catalogue.engine.replace('==', '-')}.json"
    assert cached_file.is_file()
    started = time.perf_counter()
    again = load_catalogue(catalogue.engine, build=False)
    assert time.perf_counter() - started < 0.1  # `vdeploy plan` reads it on every run
    assert again == catalogue and again.digest == catalogue.digest

    monkeypatch.setenv("VDEPLOY_CACHE_DIR", str(tmp_path))
    assert load_catalogue(catalogue.engine, build=False) is None


# ---- checking [serve]: one line naming the key ---------------------------------------------------

BAD_SERVE = [
    # (the [serve] lines, the key named, the line of the problem, words the message must hold)
    ("max-model-length = 4096", "max-model-length", 5, ["did you mean 'max-model-len'"]),
    ('dtype = "fp64"', "dtype", 5, ['"fp64"', "bfloat16", "half"]),
    ('gpu-memory-utilization = "high"', "gpu-memory-utilization", 5, ['"high"', "a number"]),
    ('max-model-len = "32Q"', "max-model-len", 5, ['"32Q"', '"32K"', '"auto"']),
    ('max-model-len = "1.5K"', "max-model-len", 5, ["not a size"]),
    ("max-num-seqs = 8.5", "max-num-seqs", 5, ["an integer", "8.5"]),
    ('enforce-eager = "yes"', "enforce-eager", 5, ["true or false", '"yes"']),
    ("served-model-name = 3", "served-model-name", 5, ["a string", "3"]),
    ('speculative-config = "ngram"', "speculative-config", 5, ["a table"]),
    ('allowed-origins = "*"', "allowed-origins", 5, ["a list"]),
    ("enable-log-outputs = true", "enable-log-outputs", 5, ["needs enable-log-requests"]),
    ('port = 8000\nenable-auto-tool-choice = true', "enable-auto-tool-choice", 6, ["needs tool-call-parser"]),
    ('spec-model = "Qwen/Qwen3-0.6B"', "spec-model", 5, ['speculative-config = { model = "org/draft"', "locked"]),
    ("tp = 2", "tp", 5, ["short form of tensor-parallel-size", "tensor-parallel-size = 2"]),
    ('"-tp" = 2', "tp", 5, ["short form of tensor-parallel-size"]),
    ("ep = true", "ep", 5, ["enable-expert-parallel = true"]),
    ("no-enforce-eager = true", "no-enforce-eager", 5, ["write enforce-eager = false"]),
    ('"compilation-config.mode" = 3', "compilation-config.mode", 5, ["compilation-config = { mode = ... }"]),
    ('hf-token = "hf_abc"', "hf-token", 5, ["remove hf-token"]),
]


@pytest.mark.parametrize("lines, key, line, words", BAD_SERVE, ids=[case[1] for case in BAD_SERVE])
def test_a_bad_serve_value_is_one_line_naming_the_key(catalogue, tmp_path, lines, key, line, words):
    manifest = write_manifest(tmp_path, lines)
    with pytest.raises(ManifestError) as caught:
        check_serve(manifest.serve, catalogue, manifest)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'vdeploy.toml'}:{line}: [serve] {key}: ")
    for word in words:
        assert word in message


STATIC_BAD_SERVE = [
    ("tp = 4", ["short form of tensor-parallel-size"]),
    ('max-model-len = "32Q"', ["not a size"]),
    ("enable-log-outputs = true", ["needs enable-log-requests"]),
    ('limit-mm-per-prompt = "image"', ["a table"]),
    ("served-model-name = []", ["cannot be passed as a flag"]),
]


@pytest.mark.parametrize("lines, words", STATIC_BAD_SERVE)
def test_without_an_engine_what_can_be_checked_still_is(tmp_path, lines, words):
    manifest = write_manifest(tmp_path, lines)
    with pytest.raises(ManifestError) as caught:
        check_serve(manifest.serve, None, manifest)
    assert all(word in str(caught.value) for word in words)


def test_without_an_engine_unknown_flags_pass_and_the_skipped_check_is_named(tmp_path):
    manifest = write_manifest(tmp_path, 'some-future-flag = 3\nmax-model-len = "32k"\n')
    serve, skipped = check_serve(manifest.serve, None, manifest)
    assert serve == {"max-model-len": "32k", "some-future-flag": 3}
    assert skipped == [NO_ENGINE]


@pytest.mark.parametrize("written", [32768, "32K", "32k", "1M", "1m", "25.6k", -1, "auto", "AUTO"])
def test_max_model_len_keeps_the_written_size(catalogue, tmp_path, written):
    manifest = write_manifest(tmp_path, f"max-model-len = {written!r}".replace("'", '"'))
    serve, skipped = check_serve(manifest.serve, catalogue, manifest)
    assert serve == {"max-model-len": written} and skipped == []


def test_size_words_mean_what_vllm_makes_of_them():
    assert [parse_size(w) for w in ("32K", "32k", "1M", "1m", "25.6k", "4096", "auto", "-1")] == [
        32768, 32000, 1048576, 1000000, 25600, 4096, -1, -1,
    ]


def test_a_single_string_for_a_list_flag_becomes_a_list(catalogue, tmp_path):
    manifest = write_manifest(tmp_path, 'served-model-name = "qwen"\napi-key = { env = "K" }\n')
    serve, _ = check_serve(manifest.serve, catalogue, manifest)
    assert serve == {"api-key": {"env": "K"}, "served-model-name": ["qwen"]}


# ---- rendering -------------------------------------------------------------------------------------


def test_render_booleans(catalogue):
    serve = {"enforce-eager": True, "enable-prefix-caching": False, "headless": True, "disable-log-stats": False}
    assert render_serve(serve, catalogue) == ["--no-enable-prefix-caching", "--enforce-eager", "--headless"]


def test_render_lists_tables_sizes_and_no_secret(catalogue):
    serve = {
        "served-model-name": ["qwen3", "qwen"],
        "middleware": ["a.M1", "b.M2"],
        "cudagraph-capture-sizes": [1, 2, 4],
        "speculative-config": {"num_speculative_tokens": 2, "method": "ngram"},
        "allowed-origins": ["https://a.example"],
        "max-model-len": "32K",
        "api-key": {"env": "VLLM_API_KEY"},
    }
    assert render_serve(serve, catalogue) == [
        "--allowed-origins", '["https://a.example"]',
        "--cudagraph-capture-sizes", "1", "2", "4",
        "--max-model-len", "32K",
        "--middleware", "a.M1", "--middleware", "b.M2",
        "--served-model-name", "qwen3", "qwen",
        "--speculative-config", '{"method":"ngram","num_speculative_tokens":2}',
    ]
    assert render_serve({"max-model-len": -1}, catalogue) == ["--max-model-len=-1"]


def test_render_without_an_engine_goes_by_toml_type():
    serve = {"enforce-eager": False, "allowed-origins": ["*"], "served-model-name": ["a", "b"], "port": 8000}
    assert render_serve(serve, None) == [
        "--allowed-origins", '["*"]', "--no-enforce-eager", "--port", "8000", "--served-model-name", "a", "b",
    ]


# ---- every flag of the seed, accepted by the real parser -----------------------------------------

# What the manifest sets for each flag vdeploy owns (they live in their own tables).
OWNED_IN_ALL_FLAGS = {
    "model": lambda m: m.model.repo == "Qwen/Qwen3-0.6B",
    "tokenizer": lambda m: m.tokenizer is not None,
    "download-dir": lambda m: m.download_dir is not None,
    "trust-remote-code": lambda m: m.policy.trust_remote_code == "pinned",
    "seed": lambda m: m.seed != 0,
    "chat-template": lambda m: m.chat_template is not None,
}


def test_all_flags_example_sets_every_flag_of_the_seed():
    manifest = load_manifest(ALL_FLAGS)
    seed_flags = set(re.findall(r"`--([a-z][a-z-]+)`", SEED.read_text()))
    assert len(seed_flags) > 40
    for flag in sorted(seed_flags):
        if flag in OWNED_FLAGS:
            assert OWNED_IN_ALL_FLAGS[flag](manifest), flag
        else:
            assert flag in manifest.serve, flag


def test_all_flags_example_is_accepted_by_the_real_parser(catalogue, tmp_path):
    manifest = load_manifest(ALL_FLAGS)
    serve, skipped = check_serve(manifest.serve, catalogue, manifest)
    argv = render_serve(serve, catalogue)
    assert skipped == [] and "--api-key" not in argv
    parsed = parse_engine_argv(sys.executable, [str(tmp_path), *argv])
    assert parsed["model_tag"] == str(tmp_path)
    assert parsed["api_key"] is None  # the key goes through VLLM_API_KEY, never argv
    assert parsed["tensor_parallel_size"] == 2
    assert parsed["speculative_config"] == manifest.serve["speculative-config"]
    assert parsed["max_model_len"] == parse_size(manifest.serve["max-model-len"])
    for key, value in serve.items():
        if key == "api-key":
            continue
        spec = catalogue.flags[key]
        expected = parse_size(value) if spec.kind == "size" and isinstance(value, str) else value
        assert parsed[spec.dest] == expected, key


def test_the_real_parser_refusal_is_one_line(catalogue, tmp_path):
    with pytest.raises(EngineError) as caught:
        parse_engine_argv(sys.executable, [str(tmp_path), "--dtype", "fp64"])
    assert "\n" not in str(caught.value)
    assert "invalid choice: 'fp64'" in str(caught.value)


# ---- init --from-command: round trip -------------------------------------------------------------

ROUND_TRIPS = [
    (
        "vllm serve Qwen/Qwen3-8B -tp 2 --max-model-len 32K --enable-auto-tool-choice "
        "--tool-call-parser qwen3_coder --reasoning-parser qwen3 "
        "--default-chat-template-kwargs '{\"thinking\": true}'",
        {"model": {"repo": "Qwen/Qwen3-8B"}},
        [
            "--default-chat-template-kwargs", '{"thinking":true}', "--enable-auto-tool-choice",
            "--max-model-len", "32K", "--reasoning-parser", "qwen3", "--tensor-parallel-size", "2",
            "--tool-call-parser", "qwen3_coder",
        ],
    ),
    (
        "python -m vllm.entrypoints.openai.api_server --model ./models/qwen --served-model-name qwen3 chat "
        "--host 0.0.0.0 --port 8000 --api-key sk-secret-1 --allowed-origins '[\"https://app.example.com\"]' "
        "--enable-log-requests --enable-log-outputs --ssl-keyfile key.pem --ssl-certfile cert.pem",
        {"model": {"path": "./models/qwen"}},
        [
            "--allowed-origins", '["https://app.example.com"]', "--enable-log-outputs", "--enable-log-requests",
            "--host", "0.0.0.0", "--port", "8000", "--served-model-name", "qwen3", "chat",
            "--ssl-certfile", "cert.pem", "--ssl-keyfile", "key.pem",
        ],
    ),
    (
        "vllm serve Qwen/Qwen3-30B-A3B -pp 2 -dp 2 -tp 4 -ep --nnodes 2 --node-rank 0 "
        "--master-addr 10.0.0.1 --master-port 29501 --distributed-executor-backend mp "
        "--speculative-config '{\"method\":\"qwen3_next_mtp\",\"num_speculative_tokens\":2}'",
        {"model": {"repo": "Qwen/Qwen3-30B-A3B"}},
        [
            "--data-parallel-size", "2", "--distributed-executor-backend", "mp", "--enable-expert-parallel",
            "--master-addr", "10.0.0.1", "--master-port", "29501", "--nnodes", "2", "--node-rank", "0",
            "--pipeline-parallel-size", "2",
            "--speculative-config", '{"method":"qwen3_next_mtp","num_speculative_tokens":2}',
            "--tensor-parallel-size", "4",
        ],
    ),
    (
        "vllm serve Qwen/Qwen2.5-VL-7B-Instruct --revision v1.0 --tokenizer Qwen/Qwen2.5-VL-7B-Instruct "
        "--download-dir /data/models --trust-remote-code --seed 42 --dtype bfloat16 --kv-cache-dtype fp8 "
        "-q fp8 --load-format safetensors --chat-template ./template.jinja --language-model-only "
        "--limit-mm-per-prompt '{\"image\": 1, \"video\": 1}' --enforce-eager --gpu-memory-utilization 0.85 "
        "--max-num-seqs 16 --max-num-batched-tokens 8192 --cpu-offload-gb 4 --no-enable-prefix-caching",
        {
            "model": {"repo": "Qwen/Qwen2.5-VL-7B-Instruct", "revision": "v1.0"},
            "tokenizer": {"repo": "Qwen/Qwen2.5-VL-7B-Instruct"},
            "chat-template": {"file": "./template.jinja"},
            "runtime": {"seed": 42},
            "policy": {"trust-remote-code": "pinned"},
            "store": {"download-dir": "/data/models"},
        },
        [
            "--cpu-offload-gb", "4", "--dtype", "bfloat16", "--no-enable-prefix-caching", "--enforce-eager",
            "--gpu-memory-utilization", "0.85", "--kv-cache-dtype", "fp8", "--language-model-only",
            "--limit-mm-per-prompt", '{"image":1,"video":1}', "--load-format", "safetensors",
            "--max-num-batched-tokens", "8192", "--max-num-seqs", "16", "--quantization", "fp8",
        ],
    ),
]


@pytest.mark.parametrize("command, tables, argv", ROUND_TRIPS, ids=["tools", "network", "parallel", "model"])
def test_init_from_command_gives_back_the_same_flags(catalogue, tmp_path, command, tables, argv):
    text = manifest_from_command(command, catalogue)
    (tmp_path / "vdeploy.toml").write_text(text)
    (tmp_path / "template.jinja").write_text("{{ messages[0]['content'] }}")
    data = tomllib.loads(text)
    # init names the engine whose flags read the command: the lock needs it
    assert data["runtime"].pop("engine") == catalogue.engine
    if not data["runtime"]:
        del data["runtime"]
    for table, expected in tables.items():
        assert data[table] == expected, table
    manifest = load_manifest(tmp_path)
    serve, _ = check_serve(manifest.serve, catalogue, manifest)
    assert render_serve(serve, catalogue) == argv


def test_init_names_the_api_key_and_never_writes_it(catalogue):
    text = manifest_from_command("vllm serve org/model --api-key sk-secret-1 sk-secret-2", catalogue)
    assert "sk-secret" not in text
    assert "export it before `vdeploy up`" in text
    assert 'env = "VLLM_API_KEY"' in text


@pytest.mark.parametrize("command, words", [
    ("vllm serve org/model --max-model-lenght 4096", ["--max-model-lenght is not a flag"]),
    ("docker run vllm/vllm-openai", ["not a vLLM server command"]),
    ("vllm serve --port 8000", ["names no model"]),
    ("vllm serve org/model --chat-template 'a", ["quotes"]),
])
def test_init_refuses_what_it_cannot_read_in_one_line(catalogue, command, words):
    with pytest.raises(VdeployError) as caught:
        manifest_from_command(command, catalogue)
    assert "\n" not in str(caught.value)
    assert all(word in str(caught.value) for word in words)
