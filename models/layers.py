"""Layers shared by every model family: RMSNorm, the SwiGLU MLP, the attention block (RoPE in it).

Every weight is an `nnx.Param` carrying `logical_axes` (names such as "embed",
"heads", "mlp", "vocab"); `sharding/` maps those names to mesh axes. Shape letters:
T tokens in the step, E hidden, H query heads, K KV heads, D head dim, F FFN, V vocab.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.attention import AttentionMetadata, KVPages
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
        # Normalise in float32, scale in the compute dtype (as HF does).
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * x32.astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up as one weight (E, 2, F): one GEMM."""

    def __init__(self, hidden: int, ffn: int, dtype, rngs: nnx.Rngs, bias: bool = False):
        self.gate_up = param(rngs, (hidden, 2, ffn), ("embed", None, "mlp"), dtype)
        self.down = param(rngs, (ffn, hidden), ("mlp", "embed"), dtype)
        self.gate_up_bias = zeros((2, ffn), (None, "mlp"), dtype) if bias else None
        self.down_bias = zeros((hidden,), ("embed",), dtype) if bias else None

    def __call__(self, x: Float[Array, "T E"]) -> Float[Array, "T E"]:
        gu = jnp.einsum("te,ecf->tcf", x, self.gate_up[...])
        if self.gate_up_bias is not None:
            gu = gu + self.gate_up_bias[...]
        out = (jax.nn.silu(gu[:, 0]) * gu[:, 1]) @ self.down[...]
        return out + self.down_bias[...] if self.down_bias is not None else out


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
        k_pages: KVPages,
        v_pages: KVPages,
        meta: AttentionMetadata,
        rope: tuple[Float[Array, "T D2"], Float[Array, "T D2"]],
        backend: str,
        mesh: jax.sharding.Mesh | None = None,
    ) -> tuple[Float[Array, "T E"], KVPages, KVPages]:
        qkv = jnp.einsum("te,ekgd->tkgd", x, self.qkv[...])
        if self.qkv_bias is not None:
            qkv = qkv + self.qkv_bias[...]
        out, k_pages, v_pages = write_and_attend(  # (T, H, D)
            qkv, k_pages, v_pages, meta, rope, scale=self.scale, backend=backend, mesh=mesh
        )
        out = jnp.einsum("thd,hde->te", out, self.o[...])
        if self.o_bias is not None:
            out = out + self.o_bias[...]
        return out, k_pages, v_pages
