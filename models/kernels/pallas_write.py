"""Pallas GPU (Triton back end): RoPE and the KV-cache write of a step in one launch.

NOTE: at small batches a decode step is a chain of tiny kernels, and each costs
a launch and a ramp whatever it moves. Left to XLA, rotating q and k and
scattering k and v into the cache are three of them per layer; here they are one.
A program takes `block_t` consecutive tokens and one KV head; its tile rows are
(token, query head of the group), the group padded to a power of two:

    qkv[t, kv]  =  [ q_0 .. q_{G-1} | k | v ]     (G + 2, D), one KV head's slice
    q_out[t, kv * G + g]     <- rope(q_g)        (cos and sin of the token's angles:
                                                   one table per step, shared by the layers)
    k_pages[kv, slot[t]]     <- rope(k)
    v_pages[kv, slot[t]]     <- v

The pages are aliased in and out, so the cache is written in place (the step
donates it). Padding tokens write their slot in the trash page, as in the
reference (models.kernels.reference.rope_and_write), which defines the result.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from models.kernels import reference
from models.kernels.pallas_gpu import is_pow2, next_pow2

TILE_ROWS = 64  # (token, query head) rows per program


def supports(qkv, k_pages) -> bool:
    """Whether the kernel handles these shapes: each half of a head is a power-of-two tile of >= 16."""
    d = qkv.shape[-1]
    return d >= 32 and is_pow2(d) and qkv.shape[1] == k_pages.shape[0]


def _kernel(qkv_ref, slot_ref, cos_ref, sin_ref, _k_in, _v_in, q_ref, k_ref, v_ref, *,
            block_t: int, group: int, group_pad: int):
    blk, kv = pl.program_id(0), pl.program_id(1)
    num_tokens, d = qkv_ref.shape[0], qkv_ref.shape[-1]
    half = d // 2
    lo = jnp.arange(half)[None, :]
    hi = lo + half

    def rotate(x_at, out_at, dtype, rows, mask, tok):  # rows of (token, head) -> rope'd rows of out
        full = jnp.broadcast_to(mask[:, None], (rows, half))
        cos = plgpu.load(cos_ref.at[tok[:, None], lo], mask=full, other=0.0)  # (R, D/2), the token's angles
        sin = plgpu.load(sin_ref.at[tok[:, None], lo], mask=full, other=0.0)
        x1 = plgpu.load(x_at(lo), mask=full, other=0.0).astype(jnp.float32)
        x2 = plgpu.load(x_at(hi), mask=full, other=0.0).astype(jnp.float32)
        plgpu.store(out_at(lo), (x1 * cos - x2 * sin).astype(dtype), mask=full)
        plgpu.store(out_at(hi), (x2 * cos + x1 * sin).astype(dtype), mask=full)

    # Query heads: tile row r is token blk * block_t + r // group_pad, head r % group_pad.
    rows = block_t * group_pad
    r = jnp.arange(rows)
    tok = blk * block_t + lax.shift_right_logical(r, group_pad.bit_length() - 1)
    g = r & (group_pad - 1)
    ok = (tok < num_tokens) & (g < group)
    # A padded head's row gets an address past the last head: Triton never touches masked
    # rows, and interpret mode drops out-of-range ones rather than race a live row.
    head = jnp.where(g < group, kv * group + g, q_ref.shape[1] + r)
    rotate(lambda c: qkv_ref.at[tok[:, None], kv, g[:, None], c],
           lambda c: q_ref.at[tok[:, None], head[:, None], c], q_ref.dtype, rows, ok, tok)

    # K and V: one row per token.
    tok = blk * block_t + jnp.arange(block_t)
    ok = tok < num_tokens
    slot = plgpu.load(slot_ref.at[tok], mask=ok, other=0)
    rotate(lambda c: qkv_ref.at[tok[:, None], kv, group, c],
           lambda c: k_ref.at[kv, slot[:, None], c], k_ref.dtype, block_t, ok, tok)
    col = jnp.arange(d)[None, :]
    full = jnp.broadcast_to(ok[:, None], (block_t, d))
    v = plgpu.load(qkv_ref.at[tok[:, None], kv, group + 1, col], mask=full, other=0.0)
    plgpu.store(v_ref.at[kv, slot[:, None], col], v.astype(v_ref.dtype), mask=full)


def rope_and_write(
    qkv: Float[Array, "T K G2 D"],
    k_pages: Float[Array, "KV N S D"],
    v_pages: Float[Array, "KV N S D"],
    slot_mapping: Int[Array, " T"],
    cos: Float[Array, "T D2"],
    sin: Float[Array, "T D2"],
    *,
    interpret: bool = False,
):
    """As `reference.rope_and_write`, in one launch (the reference where the shapes do not fit)."""
    if not supports(qkv, k_pages):
        return reference.rope_and_write(qkv, k_pages, v_pages, slot_mapping, cos, sin)
    t, kv, g2, d = qkv.shape
    group = g2 - 2
    group_pad = next_pow2(group)
    block_t = max(1, TILE_ROWS // group_pad)
    _, n, s, _ = k_pages.shape
    kernel = functools.partial(_kernel, block_t=block_t, group=group, group_pad=group_pad)
    q, k_flat, v_flat = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(t, block_t), kv),
        out_shape=(
            jax.ShapeDtypeStruct((t, kv * group, d), qkv.dtype),
            jax.ShapeDtypeStruct((kv, n * s, d), k_pages.dtype),
            jax.ShapeDtypeStruct((kv, n * s, d), v_pages.dtype),
        ),
        input_output_aliases={4: 1, 5: 2},  # the pages
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name=f"rope_and_write_g{group}",
    )(qkv, slot_mapping, cos, sin, k_pages.reshape(kv, n * s, d), v_pages.reshape(kv, n * s, d))
    return q, k_flat.reshape(kv, n, s, d), v_flat.reshape(kv, n, s, d)
