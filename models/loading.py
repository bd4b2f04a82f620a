"""Build a model with random weights, or load one from a checkpoint, placing each weight as it is read.

`place(path, logical_axes, array)` puts one host array on devices; `sharding/`
supplies one that shards by logical axes (`sharding.Placement`, which random
weights and Orbax restores also use to create each array straight in its shards).
The default puts everything on the default device.
"""

import collections
import functools
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.config import ModelConfig
from models.orbax_checkpoint import is_orbax_checkpoint, read_model_config, restore_model
from models.registry import model_class
from sharding.rules import Placement, named_sharding

Place = Callable[[tuple, tuple, np.ndarray], jax.Array]
DRAW_IN_SHARDS_BYTES = 1 << 30  # random weights above this size are drawn in their shards


def _default_place(path, axes, array):
    del path, axes
    return jax.device_put(array)


def _dtype(dtype):
    return jnp.dtype({"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}.get(dtype, dtype))


def abstract_model(cfg: ModelConfig, dtype):
    cls = model_class(cfg.architecture)
    return nnx.eval_shape(lambda: cls(cfg, _dtype(dtype), rngs=nnx.Rngs(0)))


def random_model(cfg: ModelConfig, dtype="float32", seed: int = 0, place: Placement | None = None):
    """A model with random weights (benchmarks and tests; speed does not depend on weight values).

    With `place`, the weights are put on its mesh; the values do not depend on the mesh.
    Models above DRAW_IN_SHARDS_BYTES are drawn directly in their shards, so a model
    larger than one device still starts; smaller ones are drawn on one device and
    copied out, which compiles far less.
    """
    cls = model_class(cfg.architecture)
    dtype = _dtype(dtype)
    if place is None:
        return cls(cfg, dtype, rngs=nnx.Rngs(seed))
    if cfg.num_params * dtype.itemsize <= DRAW_IN_SHARDS_BYTES:
        model = cls(cfg, dtype, rngs=nnx.Rngs(seed))
        for key, var in nnx.to_flat_state(nnx.state(model)):
            var.set_value(place(key, var.get_metadata().get("logical_axes"), np.asarray(var.get_value())))
        return model
    # One small compiled draw per (shape, sharding), shared by all layers: compiling the whole
    # init as one graph takes minutes at 8B. Matrices get normal(0, 1 / sqrt(shape[0])) values,
    # norm scales ones, biases zeros: the model's own init, up to the scale of a few matrices.
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = dict(nnx.to_flat_state(state))
    draw = functools.cache(lambda shape, sharding, kind: jax.jit(
        lambda k: (jnp.ones(shape, dtype) if kind == "ones" else jnp.zeros(shape, dtype) if kind == "zeros"
                   else (jax.random.normal(k, shape, jnp.float32) * shape[0] ** -0.5).astype(dtype)),
        out_shardings=sharding))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(sorted(flat.items(), key=lambda kv: str(kv[0]))):
        if not isinstance(var, nnx.Param):  # the one constant, the RoPE frequencies, comes from the config
            assert path == ("inv_freq",), f"no random value for the non-parameter {path}"
            var.set_value(place(path, None, cfg.rope_inv_freq()))  # replicated over the mesh
            continue
        kind = "ones" if path[-1] == "weight" else "zeros" if path[-1].endswith("bias") else "normal"
        sharding = place.sharding(var.get_metadata().get("logical_axes"), var.shape)
        var.set_value(draw(tuple(var.shape), sharding, kind)(jax.random.fold_in(key, i)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_config(path: str | os.PathLike) -> ModelConfig:
    """The config of a checkpoint: an HF folder, a .gguf file or a converted Orbax folder."""
    if is_orbax_checkpoint(path):
        return read_model_config(path)
    from models.loaders import read_config

    return ModelConfig.from_hf(read_config(path))


def load_model(path: str | os.PathLike, dtype="float32", place: Place | None = None):
    """Load an HF folder (safetensors), a .gguf file or a converted Orbax folder. Returns (model, config)."""
    if is_orbax_checkpoint(path):
        if place is not None and not isinstance(place, Placement):
            raise TypeError("restoring an Orbax checkpoint onto devices needs a sharding.Placement as `place`")
        return restore_model(path, _dtype(dtype), place)
    from models.loaders import CheckpointError, iter_tensors, read_config
    dtype = _dtype(dtype)
    cfg = ModelConfig.from_hf(read_config(path))
    cls = model_class(cfg.architecture)
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = dict(nnx.to_flat_state(state))
    by_name = cls.hf_param_map(cfg)
    parts_of = collections.Counter(spec.path for spec in by_name.values())
    arrived: dict[tuple, list] = collections.defaultdict(list)  # path -> [(spec, staged tensor)]
    filled: dict[tuple, jax.Array] = {}
    seen: set[str] = set()
    np_dtype = np.float32 if dtype == jnp.float32 else dtype
    to_device = _LayoutOnDevice(place)
    for name, array in iter_tensors(path, dtype=np_dtype):
        if name not in by_name:
            raise CheckpointError(f"{path}: unexpected tensor {name!r} for {cfg.architecture}")
        spec = by_name[name]
        seen.add(name)
        var = flat[spec.path]
        expected = list(var.shape)
        if spec.part is not None:
            expected[spec.axis] = spec.part.stop - spec.part.start
        try:
            shape = jax.eval_shape(spec.to_ours, jax.ShapeDtypeStruct(array.shape, array.dtype)).shape
        except (TypeError, ValueError):
            shape = None
        if shape != tuple(expected):
            raise CheckpointError(
                f"{path}: tensor {name!r} has shape {array.shape}, expected one matching {tuple(expected)}")
        arrived[spec.path].append((spec, to_device.stage(array)))
        if len(arrived[spec.path]) == parts_of[spec.path]:
            pieces = sorted(arrived.pop(spec.path), key=lambda p: p[0].part.start if p[0].part else 0)
            filled[spec.path] = to_device(spec.path, var.get_metadata().get("logical_axes"), pieces, tuple(var.shape))
    missing = [k for k in by_name if k not in seen]
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for key, var in flat.items():
        if key in filled:
            var.set_value(filled[key])
        elif key == ("inv_freq",):
            var.set_value((place or _default_place)(key, None, cfg.rope_inv_freq()))  # replicated
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    return model, cfg


class _LayoutOnDevice:
    """Puts checkpoint tensors on their devices in our layout, changing the layout there.

    A tensor travels in the checkpoint's layout (contiguous as read, `stage`), then one
    compiled function per kind of parameter (qkv, o, ..., shared by the layers, whose
    transform depends only on the kind) transposes it, joins the parts of a fused
    parameter, pads heads and reshards it on the devices: transposing gigabytes in numpy
    on the host would cost most of the load time. A caller's own `place` callable gets
    host arrays in our layout instead.
    """

    def __init__(self, place: Place | None):
        self.place = place
        self.fns: dict[tuple, Callable] = {}

    @property
    def on_host(self) -> bool:
        return self.place is not None and not isinstance(self.place, Placement)

    def stage(self, array: np.ndarray):
        """One checkpoint tensor, as read, on the device(s) (every device whole, for the moment)."""
        if self.on_host:
            return array
        if self.place is None:
            return jax.device_put(array)
        staging = named_sharding(self.place.mesh, None)  # each process from its own read
        return jax.make_array_from_callback(array.shape, staging, lambda index: array[index])

    def __call__(self, target: tuple, axes, pieces: list, shape: tuple) -> jax.Array:
        """The parameter at `target` from its staged `pieces` [(HFTensor, array)]; `shape`: ours, before padding."""
        specs, arrays = zip(*pieces)
        if self.on_host:
            return self.place(target, axes, np.ascontiguousarray(_join(specs, arrays, np.concatenate)))
        join = functools.partial(_join, specs, concatenate=jnp.concatenate)
        kind = target[-2:] if target[0] == "layers" else target
        key = (kind, tuple((x.shape, x.dtype) for x in arrays))
        if key not in self.fns:
            place = self.place
            if place is None:
                self.fns[key] = jax.jit(lambda *xs: join(xs))
            else:
                heads = place.heads
                self.fns[key] = jax.jit(lambda *xs: heads.pad(axes, join(xs)) if heads else join(xs),
                                        out_shardings=place.sharding(axes, place.served_shape(axes, shape)))
        return self.fns[key](*arrays)


def _join(specs, xs, concatenate):
    """A parameter in our layout from its pieces: each transformed, the parts of a fused one joined."""
    ours = [spec.to_ours(x) for spec, x in zip(specs, xs)]
    return ours[0] if len(ours) == 1 else concatenate(ours, axis=specs[0].axis)
