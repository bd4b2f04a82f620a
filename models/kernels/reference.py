"""Pure-jnp paged attention: the definition every kernel is checked against.

Each token gathers its own sequence's context through the block table and attends
causally over it. Tokens are processed in blocks so the gathered context of a
block, not of the whole step, is what lives in memory at once.
"""

import jax
import jax.numpy as jnp
from einops import rearrange
from jaxtyping import Array, Float

TOKEN_BLOCK = 32  # tokens whose context is gathered at once


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
