"""Hugging Face checkpoint folders: `config.json` plus safetensors weights.

A folder holds either one `model.safetensors` or shards listed by
`model.safetensors.index.json` (its `weight_map` maps each tensor name to a shard
file). Tensor names are already the HF names the models use, so they pass through
unchanged, except that non-parameters (`rotary_emb.inv_freq`) are dropped, and so is
a stored `lm_head.weight` when the config ties it to the embedding.

Tensors are read one at a time through `safetensors.safe_open`, which maps the file
instead of reading it whole, so a model larger than host memory can still stream
onto devices. Pickle weights (`pytorch_model.bin`) are never opened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from models.loaders.common import PICKLE_SUFFIXES, CheckpointError, describe, pickle_refusal

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_config(folder: Path) -> dict:
    """The folder's config.json, as a dict."""
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{describe(file)}: missing. An HF checkpoint folder needs the model's config.json "
            "next to its weights; copy it from where the weights came from."
        )
    return _read_json(file)


def iter_tensors(folder: Path, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array of `dtype`) for every parameter, one shard at a time.

    The config and the list of weight files are checked before this returns, so a
    broken folder fails at the call rather than at the first tensor.
    """
    tied = bool(read_config(folder).get("tie_word_embeddings", False))
    return _iter_files(_weight_files(folder), dtype, tied)


def _iter_files(files: list[Path], dtype: np.dtype, tied: bool) -> Iterator[tuple[str, np.ndarray]]:
    for file in files:
        try:
            with safe_open(file, framework="numpy") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
                        continue
                    yield name, _convert(_get_tensor(f, file, name), dtype, file, name)
        except SafetensorError as e:
            raise CheckpointError(
                f"{describe(file)}: not a readable safetensors file ({e}); it is probably "
                "truncated or corrupt, download it again."
            ) from e


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder, in shard order; refuses pickle-only folders."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{describe(index)}: has no 'weight_map'; download it again.")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(
                    f"{describe(file)}: missing, but {INDEX_FILE} lists it as a shard; "
                    "download the missing shard."
                )
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise pickle_refusal(pickles[0])
    raise CheckpointError(
        f"{describe(folder)}: holds neither {SINGLE_FILE} nor {INDEX_FILE}; "
        "pass a folder with safetensors weights, or a .gguf file."
    )


def _get_tensor(f, file: Path, name: str) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except TypeError:
        # Older safetensors releases cannot make bf16 numpy arrays; read the bytes ourselves.
        return read_raw(file, name)


def read_raw(file: Path, name: str) -> np.ndarray:
    """One tensor straight from the safetensors layout, for dtypes numpy mode lacks.

    Layout: u64 little-endian header size N, N bytes of JSON
    {name: {"dtype", "shape", "data_offsets": [begin, end]}}, then the data, with
    offsets counted from the end of the header.
    """
    dtypes = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}
    with open(file, "rb") as fh:
        header_size = int.from_bytes(fh.read(8), "little")
        info = json.loads(fh.read(header_size))[name]
        begin, end = info["data_offsets"]
        fh.seek(8 + header_size + begin)
        data = fh.read(end - begin)
    return np.frombuffer(data, dtype=dtypes[info["dtype"]]).reshape(info["shape"])


def _convert(array: np.ndarray, dtype: np.dtype, file: Path, name: str) -> np.ndarray:
    if array.dtype.kind != "f" and array.dtype != ml_dtypes.bfloat16:
        raise CheckpointError(
            f"{describe(file)}: tensor {name!r} has dtype {array.dtype}; only floating-point "
            "weights are supported (quantized safetensors formats such as GPTQ/AWQ are not)."
        )
    return array.astype(dtype, copy=False)


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{describe(file)}: not readable JSON ({e}); download it again.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{describe(file)}: expected a JSON object; download it again.")
    return data
