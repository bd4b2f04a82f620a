"""Build a model with random weights, or load one from a checkpoint, placing each weight as it is read.

`place(path, logical_axes, array)` puts one host array on devices; `sharding/`
supplies one that shards by logical axes. The default puts it on the default device.
"""

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.registry import model_class

Place = Callable[[tuple, tuple, np.ndarray], jax.Array]


def _default_place(path, axes, array):
    del path, axes
    return jax.device_put(array)


def _dtype(dtype):
    return jnp.dtype({"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(dtype, dtype))


def abstract_model(cfg: ModelConfig, dtype):
    cls = model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, _dtype(dtype), rngs=nnx.Rngs(0)))


def random_model(cfg: ModelConfig, dtype="float32", seed: int = 0):
    """A model with random weights (benchmarks and tests; speed does not depend on weight values)."""
    return model_class(cfg.architecture)(cfg, _dtype(dtype), rngs=nnx.Rngs(seed))


def load_model(path: str | os.PathLike, dtype="float32", place: Place | None = None):
    """Load an HF folder (safetensors) or a .gguf file. Returns (model, config)."""
    from models.loaders import CheckpointError, iter_tensors, read_config

    dtype = _dtype(dtype)
    place = place or _default_place
    cfg = ModelConfig.from_hf(read_config(path))
    cls = model_class(cfg.architecture)
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = dict(nnx.to_flat_state(state))
    by_name = cls.hf_param_map(cfg)
    filled: dict[tuple, jax.Array] = {}
    np_dtype = np.float32 if dtype == jnp.float32 else dtype
    for name, array in iter_tensors(path, dtype=np_dtype):
        if name not in by_name:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # some tied checkpoints still store the shared matrix twice
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for {cfg.architecture}")
        target, to_ours = by_name[name]
        value = to_ours(array)
        var = flat[target]
        if tuple(value.shape) != tuple(var.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {array.shape}, expected one matching {var.shape}")
        filled[target] = place(target, var.get_metadata().get("logical_axes"), np.asarray(value, dtype=var.dtype))
    missing = [k for k in by_name if by_name[k][0] not in filled]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, var in flat.items():
        if key in filled:
            var.set_value(filled[key])
        elif key == ("inv_freq",):
            var.set_value(jnp.asarray(cfg.rope_inv_freq()))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, cfg
