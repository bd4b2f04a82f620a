"""Layers shared by every model family: RMSNorm, RoPE, the SwiGLU MLP, the attention block.

Every weight is an `nnx.Param` carrying `logical_axes` (names such as "embed",
"heads", "mlp", "vocab"); `sharding/` maps those names to mesh axes. Shape letters:
T tokens in the step, E hidden, H query heads, K KV heads, D head dim, F FFN, V vocab.
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.attention import AttentionMetadata, KVPages
from models.sharded_attention import write_and_attend


def param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype, std: float | None = None) -> nnx.Param:
    """A weight with its logical axis names; initialised normal(0, std) (fan-in scaled by default)."""
    assert len(shape) == len(axes), (shape, axes)
    std = std if std is not None else shape[0] ** -0.5
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * std, logical_axes=axes)


def ones(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def zeros(shape: tuple[int, ...], axes: tuple[str, ...], dtype) -> nnx.Param:
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


def apply_rope(
    x: Float[Array, "T N D"], positions: Int[Array, " T"], inv_freq: Float[Array, " D2"]
) -> Float[Array, "T N D"]:
    """Rotate-half RoPE (HF's convention): pairs (i, i + D/2) rotate by position * inv_freq[i].

    Written as x * cos + swap_halves(x) * (-sin, +sin) over a (.., 2, D/2) view, so XLA
    emits one elementwise pass (a concatenate of the two halves costs a pass of its own).
    """
    t, n, d = x.shape
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # (T, D/2)
    cos = jnp.cos(angles)[:, None, None, :]  # (T, 1, 1, D/2)
    sin = jnp.sin(angles)[:, None, None, :] * jnp.array([-1.0, 1.0], jnp.float32)[:, None]  # (T, 1, 2, D/2)
    halves = x.astype(jnp.float32).reshape(t, n, 2, d // 2)
    return (halves * cos + jnp.flip(halves, axis=2) * sin).reshape(t, n, d).astype(x.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, ffn: int, dtype, rngs: nnx.Rngs, bias: bool = False):
        self.gate = param(rngs, (hidden, ffn), ("embed", "mlp"), dtype)
        self.up = param(rngs, (hidden, ffn), ("embed", "mlp"), dtype)
        self.down = param(rngs, (ffn, hidden), ("mlp", "embed"), dtype)
        self.gate_bias = zeros((ffn,), ("mlp",), dtype) if bias else None
        self.up_bias = zeros((ffn,), ("mlp",), dtype) if bias else None
        self.down_bias = zeros((hidden,), ("embed",), dtype) if bias else None

    def __call__(self, x: Float[Array, "T E"]) -> Float[Array, "T E"]:
        g = x @ self.gate[...]
        u = x @ self.up[...]
        if self.gate_bias is not None:
            g, u = g + self.gate_bias[...], u + self.up_bias[...]
        out = (jax.nn.silu(g) * u) @ self.down[...]
        return out + self.down_bias[...] if self.down_bias is not None else out


class Attention(nnx.Module):
    """Multi-head attention with grouped KV heads, RoPE, and the paged KV cache."""

    def __init__(self, cfg, dtype, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = param(rngs, (e, h, d), ("embed", "heads", "head_dim"), dtype)
        self.k = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.v = param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), dtype)
        self.o = param(rngs, (h, d, e), ("heads", "head_dim", "embed"), dtype, std=(h * d) ** -0.5)
        self.q_bias = zeros((h, d), ("heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.k_bias = zeros((k, d), ("kv_heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.v_bias = zeros((k, d), ("kv_heads", "head_dim"), dtype) if cfg.qkv_bias else None
        self.o_bias = zeros((e,), ("embed",), dtype) if cfg.o_bias else None
        self.scale = d**-0.5

    def __call__(
        self,
        x: Float[Array, "T E"],
        k_pages: KVPages,
        v_pages: KVPages,
        meta: AttentionMetadata,
        inv_freq: Float[Array, " D2"],
        backend: str,
        mesh: jax.sharding.Mesh | None = None,
    ) -> tuple[Float[Array, "T E"], KVPages, KVPages]:
        # One copy of x per projection: given a shared operand, XLA's dot merger joins the three
        # dots into one over weights it concatenates anew every step (on a GPU, for prefill shapes).
        xq, xk, xv = jax.lax.optimization_barrier((x, x, x))
        q = jnp.einsum("te,ehd->thd", xq, self.q[...])
        k = jnp.einsum("te,ekd->tkd", xk, self.k[...])
        v = jnp.einsum("te,ekd->tkd", xv, self.v[...])
        if self.q_bias is not None:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        q = apply_rope(q, meta.positions, inv_freq)
        k = apply_rope(k, meta.positions, inv_freq)
        out, k_pages, v_pages = write_and_attend(  # (T, H, D)
            q, k, v, k_pages, v_pages, meta, scale=self.scale, backend=backend, mesh=mesh
        )
        out = jnp.einsum("thd,hde->te", out, self.o[...])
        if self.o_bias is not None:
            out = out + self.o_bias[...]
        return out, k_pages, v_pages
