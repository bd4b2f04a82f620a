"""Orbax checkpoints of a model: written once (`pagedjax convert`), restored shard by shard onto any mesh.

A converted folder holds

    pagedjax_model.json   the ModelConfig, field by field, and the weights' dtype
    params/               an Orbax checkpoint, one array per parameter ("layers.0.attn.qkv", ...)
    tokenizer files       written beside them by engine.source, so the folder serves on its own

The arrays are stored in the checkpoint head layout (as HF has them), whatever
mesh they were saved from. Restoring asks Orbax for each array with the sharding
it gets on the requested mesh, so every process reads just the slices its own
devices hold, and a folder saved at tp=1 serves at tp=4 and the reverse.
"""

import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from models.config import ModelConfig, RopeScaling

CONFIG_FILE = "pagedjax_model.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    data = json.loads((Path(path) / CONFIG_FILE).read_text())["model_config"]
    rope = data.pop("rope_scaling")
    return ModelConfig(
        **{**data, "eos_token_ids": tuple(data["eos_token_ids"]), "rope_scaling": RopeScaling(**rope) if rope else None}
    )


def _params(model) -> dict[str, nnx.Variable]:
    """name -> parameter; constants derived from the config (RoPE frequencies) are not stored."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, path)): var for path, var in flat}


def save_model(model, out_dir: str | os.PathLike) -> None:
    """Write `model`'s config and parameters (checkpoint head layout, any placement) under `out_dir`."""
    out = Path(out_dir).absolute()
    params = {name: var.get_value() for name, var in _params(model).items()}
    dtype = next(iter(params.values())).dtype
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    meta = {"model_config": dataclasses.asdict(model.config), "dtype": np.dtype(dtype).name}
    if jax.process_index() == 0:
        (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def restore_model(path: str | os.PathLike, dtype, place=None):
    """Restore a converted folder as `dtype`; `place` (a sharding.Placement) puts each array on its mesh.

    Returns (model, config), like models.load_model.
    """
    from models.loading import abstract_model

    cfg = read_model_config(path)
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = dict(nnx.to_flat_state(state))
    params = {".".join(map(str, key)): (key, var) for key, var in flat.items() if isinstance(var, nnx.Param)}
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(var):
        axes = var.get_metadata().get("logical_axes")
        sharding = place.sharding(axes, var.shape) if place is not None else default
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)

    targets = {name: target(var) for name, (_, var) in params.items()}
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(Path(path).absolute() / PARAMS_DIR, targets)
    for name, (key, var) in params.items():
        value = restored[name]
        if place is not None:
            value = place.put(var.get_metadata().get("logical_axes"), value)
        var.set_value(value)
    inv_freq = np.asarray(cfg.rope_inv_freq())
    flat[("inv_freq",)].set_value(jax.device_put(inv_freq) if place is None else place(("inv_freq",), None, inv_freq))
    return nnx.merge(graphdef, nnx.from_flat_state(flat)), cfg
