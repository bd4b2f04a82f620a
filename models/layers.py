"""Layers shared by every model family: RMSNorm, the SwiGLU MLP, the attention block (RoPE in it).

The MLP and attention blocks are pre-norm residual blocks: each takes the residual
stream x and the norm in front of it and returns x + block(norm(x)). Their weight
products go through `models.projection.project`, which folds the norm, SwiGLU, the
biases and the residual add into the products when its backend can.

Every weight is an `nnx.Param` carrying `logical_axes` (names such as "embed",
"heads", "mlp", "vocab"); `sharding/` maps those names to mesh axes. Shape letters:
T tokens in the step, E hidden, H query heads, K KV heads, D head dim, F FFN, V vocab.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.attention import AttentionMetadata, KVPages
from models.kernels.reference import rms_norm
from models.projection import project
from models.sharded_attention import write_and_attend


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
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = ones((dim,), ("embed",), dtype)
        self.eps = eps

    def __call__(self, x: Float[Array, "T E"]) -> Float[Array, "T E"]:
        return rms_norm(x, self.weight[...], self.eps)


def _project(x, w: nnx.Param, bias: nnx.Param | None, matmul: str, mesh, norm: RMSNorm | None = None, **kw):
    """`project` with a weight's logical axes, its optional bias, and the norm before it."""
    if norm is not None:
        kw |= {"norm_weight": norm.weight[...], "eps": norm.eps}
    return project(x, w[...], w.get_metadata()["logical_axes"], backend=matmul, mesh=mesh,
                   bias=None if bias is None else bias[...], **kw)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one weight (E, 2, F): one GEMM."""

    def __init__(self, hidden: int, ffn: int, dtype, rngs: nnx.Rngs, bias: bool = False):
        self.gate_up = param(rngs, (hidden, 2, ffn), ("embed", None, "mlp"), dtype)
        self.down = param(rngs, (ffn, hidden), ("mlp", "embed"), dtype)
        self.gate_up_bias = zeros((2, ffn), (None, "mlp"), dtype) if bias else None
        self.down_bias = zeros((hidden,), ("embed",), dtype) if bias else None

    def __call__(self, x: Float[Array, "T E"], norm: RMSNorm, matmul: str = "xla", mesh=None) -> Float[Array, "T E"]:
        """x + down(silu(gate(n)) * up(n)), n = norm(x)."""
        gu = _project(x, self.gate_up, self.gate_up_bias, matmul, mesh, norm)  # (T, 2, F)
        return _project(gu, self.down, self.down_bias, matmul, mesh, swiglu=True, residual=x)


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
        x: Float[Array, "T E"],
        norm: RMSNorm,
        k_pages: KVPages,
        v_pages: KVPages,
        meta: AttentionMetadata,
        rope: tuple[Float[Array, "T D2"], Float[Array, "T D2"]],
        backend: str,
        mesh: jax.sharding.Mesh | None = None,
        matmul: str = "xla",
    ) -> tuple[Float[Array, "T E"], KVPages, KVPages]:
        """x + o(attention(qkv(norm(x)))), and the pages with this step's K/V written; `backend`
        picks the attention op, `matmul` the projections'."""
        qkv = _project(x, self.qkv, self.qkv_bias, matmul, mesh, norm)  # (T, K, G + 2, D)
        out, k_pages, v_pages = write_and_attend(  # (T, H, D)
            qkv, k_pages, v_pages, meta, rope, scale=self.scale, backend=backend, mesh=mesh
        )
        return _project(out, self.o, self.o_bias, matmul, mesh, residual=x), k_pages, v_pages
