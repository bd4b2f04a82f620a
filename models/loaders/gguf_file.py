"""GGUF files (llama.cpp's format): an HF-style config, and dequantized HF-named tensors.

Parsing and block dequantization come from the `gguf` package (`GGUFReader`,
`gguf.quants.dequantize`), so every type it supports is read (F32, F16, BF16, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, the K-quants, ...). What this module adds:

- Names: llama.cpp's (`blk.3.attn_q.weight`) become HF's
  (`model.layers.3.self_attn.q_proj.weight`).
- Layout: GGUF lists dims fastest-first (ne0 = columns), the reader hands numpy
  arrays in row-major order, so a 2-D weight comes out [rows, cols] = [out, in],
  torch Linear's layout, with no transpose.
- RoPE: for the `llama` architecture, llama.cpp's converter reorders the rows of Q and
  K within each head so that its RoPE, which rotates adjacent pairs (x0, x1), (x2, x3),
  ..., matches HF's rotate-half RoPE, which rotates (x0, x_{d/2}), (x1, x_{d/2+1}), ....
  `unpermute_rows` undoes that, so our models use the HF convention for every source.
  `qwen2` files are written without the reorder (llama.cpp runs qwen2 with NEOX-style,
  i.e. rotate-half, RoPE), so they are left alone.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from models.loaders.common import CheckpointError, describe

# gguf architecture -> (HF architectures entry, HF model_type, Q/K rows reordered by llama.cpp).
# Mistral checkpoints are converted with the llama architecture, so they read as Llama.
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
}

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}

# Dequantize at most this many output bytes (as float32) at once, so a big embedding
# table never needs a float32 copy next to its bf16 result.
_CHUNK_BYTES = 64 << 20


def read_config(path: Path) -> dict:
    """An HF config.json-style dict built from the file's metadata and tensor list."""
    reader = open_reader(path)
    arch = _architecture(reader, path)
    names = {t.name for t in reader.tensors}

    def get(key: str, default=None):
        field = reader.get_field(key)
        if field is None:
            return default
        value = field.contents()
        if field.types == [gguf.GGUFValueType.FLOAT32]:
            value = float(str(np.float32(value)))  # 1e-05, not 9.999999747378752e-06
        return value

    def need(key: str):
        value = get(key)
        if value is None:
            raise CheckpointError(f"{describe(path)}: metadata {key!r} is missing; the file is incomplete.")
        return value

    hf_arch, model_type, _ = _ARCHS[arch]
    hidden = need(f"{arch}.embedding_length")
    heads = need(f"{arch}.attention.head_count")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": need(f"{arch}.feed_forward_length"),
        "num_hidden_layers": need(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": get(f"{arch}.attention.key_length", hidden // heads),
        "rms_norm_eps": need(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need(f"{arch}.context_length"),
        "vocab_size": get(f"{arch}.vocab_size", int(embed.shape[1])),  # embed ne = [hidden, vocab]
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    scaling = get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear" or get(f"{arch}.rope.scale_linear") is not None:
        factor = get(f"{arch}.rope.scaling.factor") or get(f"{arch}.rope.scale_linear")
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": need(f"{arch}.rope.scaling.factor"),
            "original_max_position_embeddings": need(f"{arch}.rope.scaling.original_context_length"),
        }
    elif scaling != "none":
        raise CheckpointError(f"{describe(path)}: RoPE scaling {scaling!r} is not supported.")
    for hf_key, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if (token := get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config[hf_key] = token
    return config


def iter_tensors(path: Path, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, dequantized array of `dtype`) for every tensor, in file order.

    The file, its architecture and its tensor names are checked before this returns;
    tensor data is read lazily, one tensor per step.
    """
    reader, config = open_reader(path), read_config(path)
    named = []
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        if name is None:
            raise CheckpointError(
                f"{describe(path)}: tensor {tensor.name!r} has no counterpart in the HF "
                "Llama/Qwen2 models, so this file cannot be loaded faithfully."
            )
        named.append((tensor, name))
    # Heads per projection whose rows llama.cpp reordered for its RoPE (see module docstring).
    reordered = {}
    if _ARCHS[_architecture(reader, path)][2]:
        reordered = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    return _dequantized(named, path, dtype, reordered)


def _dequantized(named, path: Path, dtype: np.dtype, reordered: dict[str, int]) -> Iterator[tuple[str, np.ndarray]]:
    for tensor, name in named:
        array = dequantize(tensor, dtype, path)
        n_head = reordered.get(name.split(".")[-2])  # 'q_proj' of 'model.layers.0.self_attn.q_proj.weight'
        yield name, array if n_head is None else unpermute_rows(array, n_head)
    _open_cached.cache_clear()  # every tensor is read: free the parsed metadata (~160 MB for SmolLM2)


def hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF name ('blk.0.attn_q.weight' -> 'model.layers.0.self_attn.q_proj.weight')."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{kind}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's per-head Q/K row order: llama.cpp -> HF rotate-half order.

    Within one head of size d, llama.cpp stores HF row j (j < d/2) at row 2j and HF
    row j + d/2 at row 2j + 1, so RoPE's rotation pairs sit next to each other. Reading
    the head as (d/2, 2) and transposing to (2, d/2) puts them back. Works on a weight
    (rows, cols) and on a bias (rows,).
    """
    rows = w.shape[0]
    head = w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])  # (H, d/2, 2, ...)
    return head.swapaxes(1, 2).reshape(w.shape)  # (H, 2, d/2, ...) -> (rows, ...)


def dequantize(tensor: gguf.ReaderTensor, dtype: np.dtype, path: Path) -> np.ndarray:
    """A tensor's values as a numpy array of `dtype`, in numpy (row-major) dim order."""
    data = tensor.data  # memmap view: typed for F32/F16, raw bytes (rows, bytes per row) otherwise
    qtype = tensor.tensor_type
    try:
        shape = data.shape if data.dtype != np.uint8 else gguf.quants.quant_shape_from_byte_shape(data.shape, qtype)
        out = np.empty(shape, dtype)
        if data.ndim < 2:
            out[...] = gguf.quants.dequantize(data, qtype)
            return out
        rows_in, rows_out = data.reshape(-1, data.shape[-1]), out.reshape(-1, shape[-1])
        step = max(1, _CHUNK_BYTES // (4 * shape[-1]))
        for start in range(0, rows_in.shape[0], step):
            rows_out[start : start + step] = gguf.quants.dequantize(rows_in[start : start + step], qtype)
    except NotImplementedError as e:
        raise CheckpointError(
            f"{describe(path)}: tensor {tensor.name!r} is stored as {qtype.name}, which cannot be "
            "dequantized; requantize the file to a common type such as Q8_0 or Q4_K_M."
        ) from e
    return out


@functools.lru_cache(maxsize=1)
def _open_cached(path: str, mtime_ns: int, size: int) -> gguf.GGUFReader:
    del mtime_ns, size  # only part of the cache key, so a rewritten file is read again
    return gguf.GGUFReader(path)


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """A `GGUFReader` for the file, reused while the file is unchanged.

    Building one parses every metadata entry in Python (about 2 s and 160 MB for
    SmolLM2's 49k-token vocabulary), and a load needs it for both the config and the
    tensors; so the last one is kept, until `iter_tensors` has read every tensor.
    """
    path = Path(path)
    try:
        stat = path.stat()
        reader = _open_cached(str(path.absolute()), stat.st_mtime_ns, stat.st_size)
    except OSError as e:
        raise CheckpointError(f"{describe(path)}: cannot be read ({e}).") from e
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError/... on bad bytes
        raise CheckpointError(
            f"{describe(path)}: not a valid GGUF file ({type(e).__name__}: {e}); it is probably "
            "truncated or corrupt, download it again."
        ) from e
    if "token_embd.weight" not in {t.name for t in reader.tensors}:
        raise CheckpointError(f"{describe(path)}: has no token_embd.weight tensor; it is not a language model.")
    return reader


def _architecture(reader: gguf.GGUFReader, path: Path) -> str:
    """The file's gguf architecture, after checking that we can load it."""
    field = reader.get_field("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in _ARCHS:
        raise CheckpointError(
            f"{describe(path)}: GGUF architecture {arch!r} is not supported; supported: {sorted(_ARCHS)}."
        )
    split = reader.get_field("split.count")
    if split is not None and split.contents() > 1:
        raise CheckpointError(
            f"{describe(path)}: is one part of a split GGUF; merge the parts into one file "
            "with llama.cpp's `llama-gguf-split --merge` and load that."
        )
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise CheckpointError(
            f"{describe(path)}: carries per-frequency RoPE factors (rope_freqs, Llama 3.1-style "
            "scaling), which GGUF loading does not support; load the HF safetensors checkpoint instead."
        )
    return arch
