"""Build a tiny random-weight Llama model folder that vLLM (including its CPU build) can serve.

Usage: python examples/tiny/build_model.py OUT_DIR
Or:    from build_model import build_model; build_model(pathlib.Path("OUT_DIR"))

The output is byte-for-byte identical on every run, machine and library version: weights come
from Python's `random.Random.random()` (whose sequence Python guarantees for a given seed), are
written as little-endian float32 into a hand-written safetensors file, and every JSON file is
serialized with sorted keys. Neither torch nor transformers is used, because their RNGs and
`save_pretrained` output change between versions.

Files written: config.json, generation_config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja.
"""

from __future__ import annotations

import argparse
import array
import hashlib
import json
import math
import pathlib
import random
import struct
import sys

SEED = 20240601
INIT_STD = 0.02

HIDDEN_SIZE = 128
NUM_ATTENTION_HEADS = 2
NUM_KEY_VALUE_HEADS = 1
# vLLM's CPU attention only supports head sizes 32, 64, 80, 96, 112, 128, 160, ...
HEAD_DIM = 64
NUM_HIDDEN_LAYERS = 2
INTERMEDIATE_SIZE = 256
MAX_POSITION_EMBEDDINGS = 256

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
# Added but not special: they survive skip_special_tokens, like the think markers of real models.
THINK_TOKENS = ("<think>", "</think>")

# BPE merges in priority order, written in the ByteLevel alphabet ("Ġ" is the space byte).
# Chosen so that "Hello world" becomes the two tokens "Hello" and "Ġworld"; each merge only
# uses tokens that exist by the time it applies.
MERGES = (
    ("l", "l"),
    ("o", "r"),
    ("t", "h"),
    ("i", "n"),
    ("e", "r"),
    ("a", "n"),
    ("r", "e"),
    ("o", "n"),
    ("a", "t"),
    ("e", "n"),
    ("e", "s"),
    ("i", "s"),
    ("i", "t"),
    ("o", "u"),
    ("t", "o"),
    ("l", "d"),
    ("l", "o"),
    ("e", "d"),
    ("n", "d"),
    ("H", "e"),
    ("He", "ll"),
    ("Hell", "o"),
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("Ġ", "w"),
    ("Ġ", "s"),
    ("Ġ", "i"),
    ("Ġ", "o"),
    ("Ġ", "th"),
    ("Ġth", "e"),
    ("Ġw", "or"),
    ("Ġwor", "ld"),
    ("in", "g"),
    ("Ġ", "in"),
    ("Ġ", "an"),
    ("Ġan", "d"),
    ("Ġ", "is"),
    ("Ġ", "it"),
    ("Ġ", "to"),
    ("y", "ou"),
    ("Ġ", "you"),
)

CHAT_TEMPLATE_PATH = pathlib.Path(__file__).resolve().parent / "chat_template.jinja"


def byte_level_alphabet() -> list[str]:
    """Return the ByteLevel character for each byte value 0..255.

    Printable Latin-1 bytes stand for themselves; the others (controls, space, a few gaps) are
    shifted to code points from 256 upward, in byte order, so every token is printable text.
    """
    printable = set(range(ord("!"), ord("~") + 1))
    printable |= set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    alphabet = []
    next_shifted = 256
    for byte in range(256):
        if byte in printable:
            alphabet.append(chr(byte))
        else:
            alphabet.append(chr(next_shifted))
            next_shifted += 1
    return alphabet


def build_vocab() -> dict[str, int]:
    """Byte tokens (id = byte value), then merge results, then added tokens."""
    vocab = {char: byte for byte, char in enumerate(byte_level_alphabet())}
    for left, right in MERGES:
        if left not in vocab or right not in vocab:
            raise ValueError(f"merge {left!r} + {right!r} uses a token not yet in the vocabulary")
        merged = left + right
        if merged in vocab:
            raise ValueError(f"merge {left!r} + {right!r} repeats the token {merged!r}")
        vocab[merged] = len(vocab)
    for token in SPECIAL_TOKENS + THINK_TOKENS:
        vocab[token] = len(vocab)
    return vocab


def tokenizer_json(vocab: dict[str, int]) -> dict:
    """The `tokenizers` serialization of a GPT-2 style byte-level BPE tokenizer.

    The BPE model only holds byte and merge tokens; the special and think tokens live in
    `added_tokens`. A TemplateProcessing post-processor prepends BOS, as Llama tokenizers do.
    """
    added_names = set(SPECIAL_TOKENS + THINK_TOKENS)
    added_tokens = [
        {
            "content": token,
            "id": vocab[token],
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": token in SPECIAL_TOKENS,
        }
        for token in SPECIAL_TOKENS + THINK_TOKENS
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "type": "ByteLevel", "use_regex": True}
    bos = {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}
    return {
        "added_tokens": added_tokens,
        "decoder": byte_level,
        "model": {
            "byte_fallback": False,
            "continuing_subword_prefix": None,
            "dropout": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            # "a b" strings: the merges format every tokenizers version reads.
            "merges": [f"{left} {right}" for left, right in MERGES],
            "type": "BPE",
            "unk_token": None,
            "vocab": {token: index for token, index in vocab.items() if token not in added_names},
        },
        "normalizer": None,
        "padding": None,
        "post_processor": {
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos, {"Sequence": {"id": "B", "type_id": 1}}],
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "special_tokens": {BOS_TOKEN: {"id": BOS_TOKEN, "ids": [vocab[BOS_TOKEN]], "tokens": [BOS_TOKEN]}},
            "type": "TemplateProcessing",
        },
        "pre_tokenizer": byte_level,
        "truncation": None,
        "version": "1.0",
    }


def model_config(vocab: dict[str, int]) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": vocab[BOS_TOKEN],
        "eos_token_id": vocab[EOS_TOKEN],
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": MAX_POSITION_EMBEDDINGS,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_ATTENTION_HEADS,
        "num_hidden_layers": NUM_HIDDEN_LAYERS,
        "num_key_value_heads": NUM_KEY_VALUE_HEADS,
        "pad_token_id": vocab[PAD_TOKEN],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": len(vocab),
    }


def generation_config(vocab: dict[str, int]) -> dict:
    # Non-default sampling values on purpose: vLLM turns them into server-side defaults, which is
    # the behaviour vdeploy has to surface. <|im_end|> ends a chat turn, so it also stops generation.
    return {
        "bos_token_id": vocab[BOS_TOKEN],
        "do_sample": True,
        "eos_token_id": [vocab[EOS_TOKEN], vocab[IM_END_TOKEN]],
        "pad_token_id": vocab[PAD_TOKEN],
        "temperature": 0.7,
        "top_p": 0.9,
    }


def tokenizer_config() -> dict:
    # No chat_template here: the model carries it in chat_template.jinja.
    return {
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": MAX_POSITION_EMBEDDINGS,
        "pad_token": PAD_TOKEN,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map() -> dict:
    return {
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
    }


def tensor_shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes (out_features, in_features) that vLLM's Llama loader expects."""
    q_size = NUM_ATTENTION_HEADS * HEAD_DIM
    kv_size = NUM_KEY_VALUE_HEADS * HEAD_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (vocab_size, HIDDEN_SIZE),
        "model.norm.weight": (HIDDEN_SIZE,),
        "lm_head.weight": (vocab_size, HIDDEN_SIZE),
    }
    for layer in range(NUM_HIDDEN_LAYERS):
        prefix = f"model.layers.{layer}"
        shapes[f"{prefix}.input_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (HIDDEN_SIZE,)
        shapes[f"{prefix}.self_attn.q_proj.weight"] = (q_size, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.k_proj.weight"] = (kv_size, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.v_proj.weight"] = (kv_size, HIDDEN_SIZE)
        shapes[f"{prefix}.self_attn.o_proj.weight"] = (HIDDEN_SIZE, q_size)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (INTERMEDIATE_SIZE, HIDDEN_SIZE)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (HIDDEN_SIZE, INTERMEDIATE_SIZE)
    return shapes


def tensor_values(name: str, count: int) -> array.array:
    """float32 values for one tensor: ones for RMSNorm weights, small random values otherwise.

    Each tensor has its own generator, seeded from its name, so its values do not depend on
    which other tensors exist. Only `Random.random()` is used: it is the one method whose sequence
    Python promises to keep (gauss/uniform may change), mapped to a uniform distribution with
    standard deviation INIT_STD.
    """
    if name.endswith("norm.weight"):
        return array.array("f", [1.0] * count)
    name_digest = hashlib.sha256(f"{SEED}:{name}".encode()).digest()
    rng = random.Random(int.from_bytes(name_digest[:8], "little"))
    half_width = INIT_STD * math.sqrt(3.0)
    return array.array("f", [(2.0 * rng.random() - 1.0) * half_width for _ in range(count)])


def safetensors_bytes(shapes: dict[str, tuple[int, ...]]) -> bytes:
    """A safetensors file: u64 LE header length, JSON header, then tensors in sorted-name order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    chunks = []
    offset = 0
    for name in sorted(shapes):
        values = tensor_values(name, math.prod(shapes[name]))
        if sys.byteorder == "big":
            values.byteswap()
        data = values.tobytes()
        header[name] = {"data_offsets": [offset, offset + len(data)], "dtype": "F32", "shape": list(shapes[name])}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    # Padding keeps the tensor data 8-byte aligned, as the safetensors writer does.
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def build_model(out_dir: pathlib.Path) -> None:
    """Write the tiny model folder into out_dir (created if missing, files overwritten)."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab()
    # Normalize newlines so a checkout with CRLF line endings still yields the same bytes.
    chat_template = CHAT_TEMPLATE_PATH.read_bytes().replace(b"\r\n", b"\n")
    files = {
        "config.json": json_bytes(model_config(vocab)),
        "generation_config.json": json_bytes(generation_config(vocab)),
        "tokenizer.json": json_bytes(tokenizer_json(vocab)),
        "tokenizer_config.json": json_bytes(tokenizer_config()),
        "special_tokens_map.json": json_bytes(special_tokens_map()),
        "chat_template.jinja": chat_template,
        "model.safetensors": safetensors_bytes(tensor_shapes(len(vocab))),
    }
    for file_name, content in files.items():
        (out_dir / file_name).write_bytes(content)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=pathlib.Path, help="folder to write the model into")
    build_model(parser.parse_args(argv).out_dir)


if __name__ == "__main__":
    main()
