"""Pure-jnp definitions every kernel is checked against: RoPE with the KV-cache write, paged
attention, and the projections with the work around them (`fused_matmul`).

`rope_and_write` takes the fused q/k/v projection of a step, rotates q and k, and
writes k and v into their cache slots. In `paged_attention` each token gathers its
own sequence's context through the block table and attends causally over it.
Tokens are processed in blocks so the gathered context of a block, not of the
whole step, is what lives in memory at once.
"""

import jax
import jax.numpy as jnp
from einops import rearrange
from jaxtyping import Array, Float, Int

TOKEN_BLOCK = 32  # tokens whose context is gathered at once


def rms_norm(x: Float[Array, "T E"], weight: Float[Array, " E"], eps: float) -> Float[Array, "T E"]:
    """Normalise in float32, scale in the compute dtype (as HF does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def fused_matmul(
    x: Float[Array, "T ..."],
    w: Float[Array, "..."],
    *,
    norm_weight: Float[Array, " E"] | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    bias: Float[Array, "..."] | None = None,
    residual: Float[Array, "T ..."] | None = None,
) -> Float[Array, "T ..."]:
    """residual + (prologue(x) @ w + bias), contracting x's trailing axes (after T, and after the
    halves' axis with `swiglu`) with w's leading ones: x (T, *in) @ w (*in, *out) -> (T, *out).

    The prologue is RMSNorm with `norm_weight` (x then has one trailing axis), SwiGLU of
    x's two halves with `swiglu` (silu(x[:, 0]) * x[:, 1]), or none. Each step rounds to
    x's dtype, as a model written op by op does.
    """
    if swiglu:
        x = jax.nn.silu(x[:, 0]) * x[:, 1]
    elif norm_weight is not None:
        x = rms_norm(x, norm_weight, eps)
    out = jnp.tensordot(x, w, axes=x.ndim - 1)
    if bias is not None:
        out = out + bias
    return out if residual is None else residual + out


def rope_tables(positions: Int[Array, " T"], inv_freq: Float[Array, " D2"]) -> tuple[Float[Array, "T D2"], Float[Array, "T D2"]]:
    """cos and sin of every token's RoPE angles (position * inv_freq[i]), float32; a step computes them
    once, for all its layers."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq.astype(jnp.float32)[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Float[Array, "T N D"], cos: Float[Array, "T D2"], sin: Float[Array, "T D2"]) -> Float[Array, "T N D"]:
    """Rotate-half RoPE (HF's convention): pairs (i, i + D/2) rotate by position * inv_freq[i].

    Written as x * cos + swap_halves(x) * (-sin, +sin) over a (.., 2, D/2) view, so XLA
    emits one elementwise pass (a concatenate of the two halves costs a pass of its own).
    """
    t, n, d = x.shape
    sign = jnp.array([-1.0, 1.0], jnp.float32)[:, None]
    halves = x.astype(jnp.float32).reshape(t, n, 2, d // 2)
    rotated = halves * cos[:, None, None, :] + jnp.flip(halves, axis=2) * (sin[:, None, None, :] * sign)
    return rotated.reshape(t, n, d).astype(x.dtype)


def rope_and_write(
    qkv: Float[Array, "T K G2 D"],
    k_pages: Float[Array, "KV N S D"],
    v_pages: Float[Array, "KV N S D"],
    slot_mapping: Int[Array, " T"],
    cos: Float[Array, "T D2"],
    sin: Float[Array, "T D2"],
) -> tuple[Float[Array, "T H D"], Float[Array, "KV N S D"], Float[Array, "KV N S D"]]:
    """q rotated, as (T, K * G, D); k rotated and v written at their slots (in place when donated).

    qkv holds, per KV head, its G query heads, then its K and its V head (G2 = G + 2).
    """
    t, kv, g2, d = qkv.shape
    qk = apply_rope(qkv[:, :, : g2 - 1].reshape(t, -1, d), cos, sin).reshape(t, kv, g2 - 1, d)
    q, k, v = qk[:, :, :-1].reshape(t, -1, d), qk[:, :, -1], qkv[:, :, -1]
    _, n, s, _ = k_pages.shape
    flat_k = k_pages.reshape(kv, n * s, d).at[:, slot_mapping].set(k.swapaxes(0, 1).astype(k_pages.dtype))
    flat_v = v_pages.reshape(kv, n * s, d).at[:, slot_mapping].set(v.swapaxes(0, 1).astype(v_pages.dtype))
    return q, flat_k.reshape(kv, n, s, d), flat_v.reshape(kv, n, s, d)


def paged_attention(
    q: Float[Array, "T H D"],
    k_pages: Float[Array, "KV N S D"],
    v_pages: Float[Array, "KV N S D"],
    meta,
    *,
    scale: float,
) -> Float[Array, "T H D"]:
    t, h, d = q.shape
    kv_heads, _, page_size, _ = k_pages.shape
    group = h // kv_heads
    max_ctx = meta.block_tables.shape[1] * page_size

    def block(args):
        q_blk, pos_blk, seq_blk = args  # (Tb, H, D), (Tb,), (Tb,)
        pages = meta.block_tables[seq_blk]  # (Tb, P)
        k = rearrange(k_pages[:, pages], "kv t p s d -> t kv (p s) d")  # (Tb, KV, C, D)
        v = rearrange(v_pages[:, pages], "kv t p s d -> t kv (p s) d")
        qg = rearrange(q_blk, "t (kv g) d -> t kv g d", g=group).astype(jnp.float32)
        scores = jnp.einsum("tkgd,tkcd->tkgc", qg, k.astype(jnp.float32)) * scale  # (Tb, KV, G, C)
        ctx = jnp.arange(max_ctx)
        visible = (ctx[None, :] <= pos_blk[:, None]) & (ctx[None, :] < meta.seq_lens[seq_blk][:, None])
        scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
        m = jnp.max(scores, axis=-1, keepdims=True)
        p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))  # rows with nothing visible -> all zeros
        denom = jnp.sum(p, axis=-1, keepdims=True)
        out = jnp.einsum("tkgc,tkcd->tkgd", p, v.astype(jnp.float32)) / jnp.maximum(denom, 1e-30)
        return rearrange(out, "t kv g d -> t (kv g) d").astype(q.dtype)

    blk = min(TOKEN_BLOCK, t)
    pad = (-t) % blk
    positions = jnp.pad(meta.positions, (0, pad))
    token_seq = jnp.pad(meta.token_seq, (0, pad))
    q_padded = jnp.pad(q, ((0, pad), (0, 0), (0, 0)))
    n_blk = (t + pad) // blk
    out = jax.lax.map(
        block,
        (q_padded.reshape(n_blk, blk, h, d), positions.reshape(n_blk, blk), token_seq.reshape(n_blk, blk)),
    )
    return out.reshape(n_blk * blk, h, d)[:t]
