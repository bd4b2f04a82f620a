"""Builders for tiny checkpoints on disk, shared by the loader tests: HF folders and GGUF files.

The tiny model: 2 layers, hidden 32, 4 query heads and 2 KV heads of head_dim 8 (at
least 6, so that llama.cpp's Q/K row reorder is not its own inverse), FFN 48, vocab 32.
GGUF tests that need K-quants add their own wider tensors.
"""

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

TINY = dict(layers=2, hidden=32, heads=4, kv_heads=2, head_dim=8, ffn=48, vocab=32)


def tiny_hf_config(**override) -> dict:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": TINY["hidden"],
        "intermediate_size": TINY["ffn"],
        "num_hidden_layers": TINY["layers"],
        "num_attention_heads": TINY["heads"],
        "num_key_value_heads": TINY["kv_heads"],
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": TINY["vocab"],
        "tie_word_embeddings": False,
    }
    return config | override


def tiny_hf_weights(rng: np.random.Generator, bias: bool = False) -> dict[str, np.ndarray]:
    """HF-named float32 weights of the tiny model, torch Linear layout [out, in]."""
    h, f, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "mlp.gate_proj.weight": (f, h),
            p + "mlp.up_proj.weight": (f, h),
            p + "mlp.down_proj.weight": (h, f),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
        if bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,)}
            shapes |= {p + "self_attn.v_proj.bias": (kv,)}
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_hf_folder(folder: Path, weights: dict[str, np.ndarray], config: dict, shards: int = 1) -> Path:
    """config.json plus model.safetensors, or `shards` files and model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(weights, str(folder / "model.safetensors"))
        return folder
    names = sorted(weights)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[s::shards]}
        save_file(part, str(folder / file))
        weight_map |= {n: file for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


Tensors = dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType | None]]


def write_gguf(path: Path, arch: str, tensors: Tensors, **meta) -> Path:
    """A GGUF file with llama-style metadata for the tiny model and the given tensors.

    `tensors` maps a llama.cpp name to (array, raw type): a float32/float16 array with
    type None is stored as is; otherwise the array holds the encoded bytes (rows,
    bytes per row), e.g. from gguf.quants.quantize.
    """
    meta = {
        "block_count": TINY["layers"],
        "context_length": 128,
        "embedding_length": TINY["hidden"],
        "feed_forward_length": TINY["ffn"],
        "attention.head_count": TINY["heads"],
        "attention.head_count_kv": TINY["kv_heads"],
        "attention.layer_norm_rms_epsilon": 1e-6,
        "rope.freq_base": 10000.0,
    } | meta
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        full = key if key.startswith(("general.", "tokenizer.", "split.")) else f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    for name, (array, qtype) in tensors.items():
        w.add_tensor(name, array, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
