"""Layers shared by every model family: RMSNorm, the SwiGLU MLP, the attention block (RoPE in it).

The MLP and attention blocks are pre-norm residual blocks, written as blocks that
take the normalised stream h and return their output; the residual add belongs to
the norm in front of the next block, which takes the stream and the last block's
output and returns both the sum and its norm (one kernel on the GPU):

    x, h = norm(x, delta)      # x += delta; h = rmsnorm(x)
    delta = block(h)

Their weight products go through `models.projection.project`, which folds SwiGLU
and the biases into the products when its backend can.

Every weight is an `nnx.Param` carrying `logical_axes` (names such as "embed",
"heads", "mlp", "vocab"); `sharding/` maps those names to mesh axes. Shape letters:
T tokens in the step, E hidden, H query heads, K KV heads, D head dim, F FFN, V vocab.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.attention import AttentionMetadata, KVPages
from models.kernels import pallas_norm, reference
from models.projection import project
from models.sharded_attention import write_and_attend
from sharding.rules import logical_to_spec


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], dtype, std: float | None = None) -> nnx.Param:
    """A weight with its logical axis names; initialised normal(0, std) (fan-in scaled by default)."""
    assert len(shape) == len(axes), (shape, axes)
    std = std if std is not None else shape[0] ** -0.5
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, logical_axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def zeros(shape: tuple[int, ...], axes: tuple[str | None, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)


class RMSNorm(nnx.Module):
    """The residual add and the RMSNorm after it: (x + delta, rmsnorm(x + delta)); `backend` "pallas"
    runs them as one kernel (`models/kernels/pallas_norm.py`), per data shard on a mesh."""

    def __init__(self, dim: int, eps: float, dtype):
        self.weight = ones((dim,), ("embed",), dtype)
        self.eps = eps

    def __call__(
        self, x: Float[Array, "T E"], delta: Float[Array, "T E"], backend: str = "reference", mesh=None
    ) -> tuple[Float[Array, "T E"], Float[Array, "T E"]]:
        if backend != "pallas":
            return reference.add_rms_norm(x, delta, self.weight[...], self.eps)
        op = functools.partial(pallas_norm.add_rms_norm, eps=self.eps)
        if mesh is None:
            return op(x, delta, self.weight[...])
        rows, weight = logical_to_spec(("batch", "embed")), logical_to_spec(("embed",))
        return jax.shard_map(op, mesh=mesh, in_specs=(rows, rows, weight), out_specs=(rows, rows),
                             check_vma=False)(x, delta, self.weight[...])  # check_vma: a pallas_call has no types


def _project(x, w: nnx.Param, bias: nnx.Param | None, matmul: str, mesh, **kw):
    """`project` with a weight's logical axes and its optional bias."""
    return project(x, w[...], w.get_metadata()["logical_axes"], backend=matmul, mesh=mesh,
                   bias=None if bias is None else bias[...], **kw)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one weight (E, 2, F): one GEMM."""

    def __init__(self, hidden: int, ffn: int, dtype, rngs: nnx.Rngs, bias: bool = False):
        self.gate_up = param(rngs, (hidden, 2, ffn), ("embed", None, "mlp"), dtype)
        self.down = param(rngs, (ffn, hidden), ("mlp", "embed"), dtype)
        self.gate_up_bias = zeros((2, ffn), (None, "mlp"), dtype) if bias else None
        self.down_bias = zeros((hidden,), ("embed",), dtype) if bias else None

    def __call__(self, h: Float[Array, "T E"], matmul: str = "xla", mesh=None) -> Float[Array, "T E"]:
        """down(silu(gate(h)) * up(h)) of the normalised stream h."""
        gu = _project(h, self.gate_up, self.gate_up_bias, matmul, mesh)  # (T, 2, F)
        return _project(gu, self.down, self.down_bias, matmul, mesh, swiglu=True)


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, RoPE, and the paged KV cache."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = h // k
        # q, k and v as one weight, grouped by KV head: (E, K, G + 2, D) holds each KV head's G query
        # heads, then its K and its V head. One GEMM reads it, and tensor parallelism splits it over
        # KV heads, so every device holds whole groups.
        self.qkv = param(rngs, (e, k, g + 2, d), ("embed", "kv_heads", "qkv", "head_dim"), dtype)
        self.o = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype, std=(h * d) ** -0.5)
        self.qkv_bias = zeros((k, g + 2, d), ("kv_heads", "qkv", "head_dim"), dtype) if cfg.qkv_bias else None
        self.o_bias = zeros((e,), ("embed",), dtype) if cfg.o_bias else None
        self.scale = d**-0.5

    def __call__(
        self,
        h: Float[Array, "T E"],
        k_pages: KVPages,
        v_pages: KVPages,
        meta: AttentionMetadata,
        rope: tuple[Float[Array, "T D2"], Float[Array, "T D2"]],
        backend: str,
        mesh: jax.sharding.Mesh | None = None,
        matmul: str = "xla",
    ) -> tuple[Float[Array, "T E"], KVPages, KVPages]:
        """o(attention(qkv(h))) of the normalised stream h, and the pages with this step's K/V written;
        `backend` picks the attention op, `matmul` the projections'."""
        qkv = _project(h, self.qkv, self.qkv_bias, matmul, mesh)  # (T, K, G + 2, D)
        out, k_pages, v_pages = write_and_attend(  # (T, H, D)
            qkv, k_pages, v_pages, meta, rope, scale=self.scale, backend=backend, mesh=mesh
        )
        return _project(out, self.o, self.o_bias, matmul, mesh), k_pages, v_pages
