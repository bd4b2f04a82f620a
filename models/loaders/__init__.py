"""Checkpoint loaders: turn a checkpoint on disk into an HF-style config and HF-named weights.

Two sources are read, chosen by what `path` is:

- a folder: a Hugging Face checkpoint, `config.json` plus `model.safetensors` or
  shards listed in `model.safetensors.index.json` (see `safetensors_hf`);
- a `.gguf` file: llama.cpp's format, config built from its metadata and weights
  dequantized (see `gguf_file`).

Pickle checkpoints (`pytorch_model.bin`, `.pt`, `.pth`) are refused, since loading them
can execute code.

Whatever the source, the weights come out under the names and layouts of transformers'
Llama/Qwen2/Mistral models, e.g. `model.layers.0.self_attn.q_proj.weight` as
[out_features, in_features] (torch Linear), and `lm_head.weight` only when it is not
tied to `model.embed_tokens.weight`. Tensors are produced one at a time, so a model is
never held whole in host memory: `load_params` places each on devices as soon as it is
read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np

from models.loaders import gguf_file, safetensors_hf
from models.loaders.common import PICKLE_SUFFIXES, CheckpointError, as_dtype, describe, pickle_refusal

__all__ = ["CheckpointError", "iter_tensors", "load_params", "read_config"]


def read_config(path: str | os.PathLike) -> dict:
    """The model's HF config.json-style dict (architectures, hidden_size, rope_theta, ...)."""
    path = Path(path)
    return _source(path).read_config(path)


def iter_tensors(path: str | os.PathLike, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, host array) for every parameter, one at a time, converted to `dtype`.

    `dtype` is np.float32, bfloat16 (ml_dtypes or jnp) or np.float16, or one of their
    names. Quantized GGUF tensors are dequantized; non-parameters are skipped.
    """
    path = Path(path)
    return _source(path).iter_tensors(path, as_dtype(dtype))


def load_params(
    path: str | os.PathLike,
    place: Callable[[str, np.ndarray], jax.Array] | None = None,
    dtype=np.float32,
) -> dict[str, jax.Array]:
    """Read every parameter and hand it to `place(name, array)` at once; return name -> result.

    `place` decides where a tensor lives (e.g. `jax.device_put` with the sharding of
    that parameter); by default it is `jax.device_put` onto the default device. Each
    host array is dropped once placed, so host memory holds about one tensor at a time.
    """
    place = place or _put_on_default_device
    return {name: place(name, array) for name, array in iter_tensors(path, dtype)}


def _put_on_default_device(name: str, array: np.ndarray) -> jax.Array:
    del name  # every tensor goes to the same place
    return jax.device_put(array)


def _source(path: Path):
    """The reader module for `path`, or a CheckpointError saying what to pass instead."""
    if path.is_dir():
        return safetensors_hf
    if not path.exists():
        raise CheckpointError(
            f"{describe(path)}: no such file or folder; pass an HF checkpoint folder "
            "(config.json + *.safetensors) or a .gguf file."
        )
    if path.suffix in PICKLE_SUFFIXES:
        raise pickle_refusal(describe(path))
    if path.suffix == ".gguf":
        return gguf_file
    raise CheckpointError(
        f"{describe(path)}: not a checkpoint this loader reads; pass an HF checkpoint folder "
        "(the folder holding config.json and the .safetensors files) or a .gguf file."
    )
