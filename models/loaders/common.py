"""What the checkpoint readers share: the error type, the dtype argument, pickle refusal.

Kept apart from `__init__` so that `safetensors_hf` and `gguf_file` can import it
without importing each other.
"""

from __future__ import annotations

import os
from pathlib import Path

import ml_dtypes  # registers "bfloat16" with numpy, so np.dtype("bfloat16") works
import numpy as np

# Weight dtypes a reader can hand out; the key is np.dtype(...).name.
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# File suffixes of torch.save / pickle checkpoints.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint cannot be read. The message names the file and says what to do."""


def as_dtype(dtype) -> np.dtype:
    """np.float32, ml_dtypes/jnp.bfloat16, np.float16, or their names -> np.dtype."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or dt.name not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported for weights; use one of {sorted(_DTYPES)}")
    return dt


def pickle_refusal(path: str | os.PathLike) -> CheckpointError:
    """The error for a pickle checkpoint, saying why it is refused and how to convert it."""
    return CheckpointError(
        f"{path}: this is a pickle checkpoint (torch .bin/.pt/.pth). Unpickling can run "
        "arbitrary code hidden in the file, so only safetensors checkpoints are loaded. "
        "Convert it once, on a machine where you trust the file, e.g. with transformers: "
        "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(new_folder, "
        "safe_serialization=True), or with safetensors: safetensors.torch.save_file("
        "torch.load(file, weights_only=True), 'model.safetensors')."
    )


def describe(path: str | os.PathLike) -> str:
    """A path as it appears in messages: absolute, so the user can find it."""
    return str(Path(path).absolute())
