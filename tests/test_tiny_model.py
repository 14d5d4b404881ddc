"""Tests for examples/tiny/build_model.py, the builder of the tiny random-weight Llama that the
end-to-end tests serve with vLLM.

They check that the builder is deterministic (the model's bytes are what a lock records) and that
the folder holds what vLLM's Llama loader and the Hugging Face tokenizer stack expect. They need
neither vLLM nor torch; the parts that load the tokenizer need `tokenizers`, `transformers` or
`jinja2`, which come with the engine, and skip without it.
"""

from __future__ import annotations

import array
import importlib.util
import json
import math
import pathlib
import struct
import subprocess
import sys

import pytest

from needs import engine_module

EXAMPLE_DIR = pathlib.Path(__file__).resolve().parents[1] / "examples" / "tiny"
BUILDER_PATH = EXAMPLE_DIR / "build_model.py"

EXPECTED_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}
# Head sizes vLLM's CPU attention backend accepts; any other value fails at engine start.
CPU_ATTENTION_HEAD_SIZES = {32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512}
MAX_SAFETENSORS_BYTES = 3 * 1024 * 1024
MESSAGES = [{"role": "user", "content": "Hello"}]


def load_builder():
    # The example is a script, not a package module, so load it from its path.
    spec = importlib.util.spec_from_file_location("tiny_build_model", BUILDER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def builder():
    return load_builder()


@pytest.fixture(scope="module")
def model_dir(builder, tmp_path_factory) -> pathlib.Path:
    out_dir = tmp_path_factory.mktemp("tiny") / "model"
    builder.build_model(out_dir)
    return out_dir


def read_json(path: pathlib.Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def read_safetensors_header(path: pathlib.Path) -> tuple[int, dict]:
    """Return (offset of the tensor data, parsed JSON header)."""
    with path.open("rb") as file:
        (header_length,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_length))
    return 8 + header_length, header


def expected_tensor_shapes(config: dict) -> dict[str, list[int]]:
    """The tensors vLLM's Llama loader looks for, derived from config.json alone."""
    hidden = config["hidden_size"]
    q_size = config["num_attention_heads"] * config["head_dim"]
    kv_size = config["num_key_value_heads"] * config["head_dim"]
    intermediate = config["intermediate_size"]
    shapes = {
        "model.embed_tokens.weight": [config["vocab_size"], hidden],
        "model.norm.weight": [hidden],
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = [config["vocab_size"], hidden]
    for layer in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = [hidden]
        shapes[f"{prefix}.post_attention_layernorm.weight"] = [hidden]
        shapes[f"{prefix}.self_attn.q_proj.weight"] = [q_size, hidden]
        shapes[f"{prefix}.self_attn.k_proj.weight"] = [kv_size, hidden]
        shapes[f"{prefix}.self_attn.v_proj.weight"] = [kv_size, hidden]
        shapes[f"{prefix}.self_attn.o_proj.weight"] = [hidden, q_size]
        shapes[f"{prefix}.mlp.gate_proj.weight"] = [intermediate, hidden]
        shapes[f"{prefix}.mlp.up_proj.weight"] = [intermediate, hidden]
        shapes[f"{prefix}.mlp.down_proj.weight"] = [hidden, intermediate]
    return shapes


def folder_bytes(folder: pathlib.Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_two_builds_are_byte_identical(builder, tmp_path):
    builder.build_model(tmp_path / "first")
    builder.build_model(tmp_path / "second")
    first = folder_bytes(tmp_path / "first")
    assert set(first) == EXPECTED_FILES
    assert first == folder_bytes(tmp_path / "second")


def test_command_line_writes_the_same_bytes(model_dir, tmp_path):
    out_dir = tmp_path / "from_cli"
    subprocess.run([sys.executable, str(BUILDER_PATH), str(out_dir)], check=True)
    assert folder_bytes(out_dir) == folder_bytes(model_dir)


def test_text_files_are_canonical(model_dir):
    # Sorted keys, two-space indent and a final "\n": the form that stays stable across platforms.
    for name in sorted(EXPECTED_FILES - {"model.safetensors"}):
        raw = (model_dir / name).read_bytes()
        assert b"\r" not in raw, name
        assert raw.endswith(b"\n"), name
        if name.endswith(".json"):
            canonical = json.dumps(json.loads(raw), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            assert raw.decode("utf-8") == canonical, name


def test_config_describes_a_small_llama(model_dir):
    config = read_json(model_dir / "config.json")
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 128
    assert config["num_attention_heads"] == 2
    assert config["num_key_value_heads"] == 1
    assert config["num_hidden_layers"] == 2
    assert config["head_dim"] == 64
    assert config["head_dim"] in CPU_ATTENTION_HEAD_SIZES
    assert config["max_position_embeddings"] == 256
    assert config["torch_dtype"] == "float32"
    assert "auto_map" not in config  # no remote code
    tokenizer = read_json(model_dir / "tokenizer.json")
    token_count = len(tokenizer["model"]["vocab"]) + len(tokenizer["added_tokens"])
    assert config["vocab_size"] == token_count


def test_generation_config_imposes_sampling_defaults(model_dir):
    generation = read_json(model_dir / "generation_config.json")
    assert generation["temperature"] == 0.7
    assert generation["top_p"] == 0.9
    assert "transformers_version" not in generation  # would tie the bytes to a library version


def test_tokenizer_files_name_the_special_tokens(model_dir):
    tokenizer_config = read_json(model_dir / "tokenizer_config.json")
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert "chat_template" not in tokenizer_config  # the template lives in chat_template.jinja
    added = {token["content"]: token for token in read_json(model_dir / "tokenizer.json")["added_tokens"]}
    special_map = read_json(model_dir / "special_tokens_map.json")
    for token in ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"):
        assert added[token]["special"], token
    for key in ("bos_token", "eos_token", "pad_token"):
        assert tokenizer_config[key] == special_map[key]
        assert tokenizer_config[key] in added
    config = read_json(model_dir / "config.json")
    assert added["<|bos|>"]["id"] == config["bos_token_id"]
    assert added["<|eos|>"]["id"] == config["eos_token_id"]


def test_model_carries_the_example_chat_template(model_dir):
    example = (EXAMPLE_DIR / "chat_template.jinja").read_bytes().replace(b"\r\n", b"\n")
    assert (model_dir / "chat_template.jinja").read_bytes() == example


def test_safetensors_layout_matches_the_llama_loader(model_dir):
    path = model_dir / "model.safetensors"
    config = read_json(path.parent / "config.json")
    data_start, header = read_safetensors_header(path)
    assert data_start % 8 == 0
    assert header.pop("__metadata__") == {"format": "pt"}
    expected_shapes = expected_tensor_shapes(config)
    assert {name: entry["shape"] for name, entry in header.items()} == expected_shapes
    offset = 0
    for name in sorted(header):
        entry = header[name]
        assert entry["dtype"] == "F32", name
        assert entry["data_offsets"] == [offset, offset + 4 * math.prod(entry["shape"])], name
        offset = entry["data_offsets"][1]
    assert path.stat().st_size == data_start + offset
    assert path.stat().st_size < MAX_SAFETENSORS_BYTES


def test_weights_are_finite_and_small(model_dir):
    path = model_dir / "model.safetensors"
    data_start, header = read_safetensors_header(path)
    header.pop("__metadata__")
    raw = path.read_bytes()
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        values = array.array("f", raw[data_start + begin : data_start + end])
        if sys.byteorder == "big":
            values.byteswap()
        if name.endswith("norm.weight"):
            assert set(values) == {1.0}, name
        else:
            assert all(math.isfinite(value) and abs(value) < 0.1 for value in values), name


def test_tokenizers_library_round_trips_text(model_dir):
    tokenizers = engine_module("tokenizers")
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    encoding = tokenizer.encode("Hello world")
    # BOS comes from the post-processor; the merges turn each word into a single token.
    assert encoding.tokens == ["<|bos|>", "Hello", "Ġworld"]
    assert tokenizer.decode(encoding.ids) == "Hello world"
    assert tokenizer.encode("<|im_start|>user<|im_end|>", add_special_tokens=False).tokens[0] == "<|im_start|>"
    assert tokenizer.get_vocab_size() == read_json(model_dir / "config.json")["vocab_size"]


def test_transformers_loads_tokenizer_and_chat_template(model_dir):
    transformers = engine_module("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer("Hello world").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello world"
    if tokenizer.chat_template is None:
        pytest.skip("this transformers version does not read chat_template.jinja")
    plain = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    thinking = tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, thinking=True)
    assert plain == "<|bos|><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert thinking == plain + "<think>"


@pytest.mark.parametrize("trim_blocks", [False, True])
def test_chat_template_renders_the_same_under_any_jinja_settings(model_dir, trim_blocks):
    jinja2 = engine_module("jinja2")
    environment = jinja2.Environment(trim_blocks=trim_blocks, lstrip_blocks=trim_blocks)
    template = environment.from_string((model_dir / "chat_template.jinja").read_text(encoding="utf-8"))
    context = {"messages": MESSAGES, "bos_token": "<|bos|>", "add_generation_prompt": True}
    assert template.render(context) == "<|bos|><|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert template.render(context, thinking=True).endswith("assistant\n<think>")
    assert template.render({"messages": MESSAGES, "bos_token": "<|bos|>"}).endswith("<|im_end|>\n")
