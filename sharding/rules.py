"""Logical axes to mesh axes: one table, and the helpers that place arrays by it.

Model code names the axes of every weight ("embed", "heads", "mlp", ...), the KV
cache names its own (models.kv_cache.CACHE_AXES), and the runner names the step's
activations ("batch"). This table alone decides which mesh axis each name is split
over; a name mapped to None is replicated along every mesh axis.
"""

import functools
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.heads import HeadLayout
from sharding.mesh import DATA, MODEL

RULES: dict[str, str | None] = {
    # parameters
    "vocab": MODEL,  # embedding rows and lm_head columns: logits come out vocab-parallel
    "embed": None,  # the residual stream is whole on every device of a model group
    "heads": MODEL,  # query heads (the o projection)
    "kv_heads": MODEL,  # KV heads (the fused q/k/v projection, and the KV cache's first axis)
    "qkv": None,  # within a KV head's group: its query heads, then its K and its V
    "mlp": MODEL,  # FFN columns of the fused gate/up, rows of down
    "head_dim": None,
    # KV cache
    "pages": DATA,  # each data shard owns its own page pool, addressed by local page ids
    # activations
    "batch": DATA,  # the tokens and sequence rows of a step: each data shard has its own
}


def logical_to_spec(
    axes: tuple[str | None, ...] | None,
    shape: tuple[int, ...] | None = None,
    mesh: Mesh | None = None,
    rules: dict[str, str | None] = RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry `axes` (None: replicated).

    Given `shape` and `mesh`, a dimension that its mesh axis does not divide is
    replicated instead of split (e.g. a vocabulary of 49155 on tp=2): correct,
    at the cost of memory. Attention heads never reach that case; see sharding.heads.
    """
    if axes is None:
        return PartitionSpec()
    spec: list[str | None] = []
    for dim, name in enumerate(axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
        mesh_axis = rules[name]
        if mesh_axis is not None and shape is not None and mesh is not None and shape[dim] % mesh.shape[mesh_axis]:
            mesh_axis = None
        if mesh_axis is not None and mesh_axis in spec:
            raise ValueError(f"axes {axes} put mesh axis {mesh_axis!r} on two dimensions")
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: tuple[str | None, ...] | None, shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


@dataclass(frozen=True)
class Placement:
    """Where a model's arrays live on a mesh, and how a checkpoint's arrays get there.

    Calling it is the `place(path, logical_axes, host_array)` of `models.loading`:
    the host array is brought to the served head layout and only the slices each
    local device holds are copied to it (so every process of a multi-host run
    places just its own shards). `sharding` and `put` serve loaders that produce
    device arrays instead (random weights, Orbax restores).
    """

    mesh: Mesh
    heads: HeadLayout | None = None  # None: heads are served as in the checkpoint

    def served_shape(self, axes, shape: tuple[int, ...]) -> tuple[int, ...]:
        return self.heads.served_shape(axes, shape) if self.heads else tuple(shape)

    def sharding(self, axes, shape: tuple[int, ...]) -> NamedSharding:
        """The sharding of an array of this shape (served or checkpoint layout alike)."""
        return named_sharding(self.mesh, axes, tuple(shape))

    def __call__(self, path, axes, array: np.ndarray) -> jax.Array:
        del path  # placement depends on the logical axes alone
        if self.heads is not None:
            array = self.heads.pad(axes, array)
        return jax.make_array_from_callback(array.shape, self.sharding(axes, array.shape), lambda index: array[index])

    def put(self, axes, x: jax.Array) -> jax.Array:
        """An on-device array in the checkpoint layout, moved to its served layout and sharding."""
        shape = self.served_shape(axes, x.shape)
        target = self.sharding(axes, shape)
        if shape == x.shape and x.sharding.is_equivalent_to(target, x.ndim):
            return x
        return _pad_fn(self.heads, axes, target)(x)


@functools.lru_cache(maxsize=None)
def _pad_fn(heads: HeadLayout | None, axes, target: NamedSharding):
    """One compiled pad-and-reshard per (layout, axes, sharding); layers share theirs."""
    return jax.jit(lambda x: heads.pad(axes, x) if heads else x, out_shardings=target)
