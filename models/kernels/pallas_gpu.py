"""Pallas GPU (Triton back end) paged attention, read straight from the KV pages.

NOTE: one kernel, run with two static configurations. A program takes one query
block (up to block_q consecutive tokens of one row) and one KV head; its tile holds
block_q x group query rows (every query head of that KV head, the group padded to a
power of two), so the group shares one read of the context. It streams the row's
context in blocks of `block_kv` positions with an online softmax (flash-attention
style), gathering K/V rows through the block table, so block and page sizes are
independent:

    context positions   0 ........ 15 | 16 ....... 31 | 32 ....... 47 | ...
    block table row b   [    7        ,      2        ,      9        , ...]
    K rows read         7*16+0..7*16+15, 2*16+0..2*16+15, 9*16+0..        (page_size 16)

- decode-shaped steps (T <= B, mostly one token per row): one launch of 16-row tiles
  (the fewest the tensor cores take; group 4 -> 4 tokens x 4 heads); for small
  batches the context is split into parts whose partial results (unnormalised
  output, running max and sum) a small jnp pass combines (split-K).
- steps that may hold prompt chunks (T > B): one launch of 64-row tiles over every
  row (fresh prompts, chunks after cached context). A program whose query block has
  at most 4 tokens (a decode row beside the prompts) runs the same loop on a 16-row
  tile instead: on a 64-row tile, 60 of its rows are masked, and the products of
  those wasted rows made a decode row's context read compute-bound. On an H100, 190
  decode rows beside two fresh prompts (2048 tokens): 0.575 -> 0.525 ms a layer.

Context blocks that every row of a tile sees whole run without masks; only the
blocks at the causal diagonal and at the ragged end are masked.

The query-block schedule (row, first token, end) is derived on device from
query_start_loc and padded to a static count, so the runner's metadata is all the
kernel needs. Tokens no row covers (the runner's padding) output zeros, and so do
tokens that see no context (padding rows have seq_len 0), as in the reference.
Scores use exp2 with log2(e) folded into the scale.

Shape rules (Triton tensors have power-of-two sizes): head_dim and page_size powers
of two, head_dim >= 16; `paged_attention` falls back to the reference otherwise.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float, Int

from models.kernels import reference

LOG2E = math.log2(math.e)
MIN_DOT_ROWS = 16  # Triton's tensor-core products take at least 16 rows
NO_SCORE = -1e30  # initial running max: finite, so exp2(max_old - max_new) never meets inf - inf
TARGET_PROGRAMS = 2 * 132  # programs that keep an H100's 132 SMs busy (sets the context split)
# Most programs of a small bucket's grid are padding that exits at once, yet more splits still cost:
# one row padded to 4 tokens (32 query-block x KV-head programs) decodes the 8B shape 0.1 ms a token
# faster with 6 splits than with the 9 that TARGET_PROGRAMS asks for (one H100, context 256 and 1024;
# 16 splits are slower still: benchmarks/NOTES-attention.md).
MAX_SPLITS = 6


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    tile_rows: int  # query rows per program (block_q tokens x padded group)
    block_kv: int  # context positions per loop step
    num_splits: int | None  # context parts per query block; None: enough programs to fill the GPU
    num_warps: int
    num_stages: int  # software-pipelining depth of the K/V loads
    short_rows: int | None = None  # a smaller tile for query blocks whose tokens fit it (None: always tile_rows)


DECODE = KernelConfig(tile_rows=16, block_kv=64, num_splits=None, num_warps=4, num_stages=3)
PREFILL = KernelConfig(tile_rows=64, block_kv=64, num_splits=1, num_warps=4, num_stages=2, short_rows=16)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supports(q: Float[Array, "T H D"], k_pages: Float[Array, "KV N S D"]) -> bool:
    """Whether the kernel handles these shapes (else use the reference)."""
    d = q.shape[-1]
    kv_heads, _, page_size, _ = k_pages.shape
    return is_pow2(d) and d >= 16 and is_pow2(page_size) and q.shape[1] % kv_heads == 0


def _kernel(*refs, tile_rows: int, short_rows: int | None, group_pad: int, **static):
    """One program: `_attend` on the full tile, or on the short one when this query block's
    tokens fit it (a branch on the block's size, the same for every thread of the program)."""
    ids = tuple(pl.program_id(axis) for axis in range(3))  # read here: interpret mode has none inside a branch
    attend = functools.partial(_attend, *refs, ids=ids, group_pad=group_pad, **static)
    if short_rows is None or short_rows >= tile_rows:
        attend(tile_rows=tile_rows)
        return
    blk_lo_ref, blk_hi_ref = refs[7:9]  # _attend's blk_lo_ref and blk_hi_ref
    short = blk_hi_ref[ids[0]] - blk_lo_ref[ids[0]] <= short_rows // group_pad
    pl.when(short)(lambda: attend(tile_rows=short_rows))
    pl.when(jnp.logical_not(short))(lambda: attend(tile_rows=tile_rows))


def _attend(
    q_ref,  # (T, H, D)
    k_ref,  # (KV, N * S, D): the pages seen as rows
    v_ref,  # (KV, N * S, D)
    bt_ref,  # (B, P)
    lens_ref,  # (B,)
    pos_ref,  # (T,)
    blk_row_ref,  # (NQ,) row of each query block
    blk_lo_ref,  # (NQ,) its first token
    blk_hi_ref,  # (NQ,) one past its last token (== lo for unused blocks)
    *out_refs,  # unsplit: zeros (T, H, D) aliased to o (T, H, D); split: o (S, T, H, D), m, l (S, T, H), f32
    ids: tuple,  # the program's (query block, KV head, split)
    tile_rows: int,
    group: int,
    group_pad: int,
    page_size: int,
    block_kv: int,
    num_splits: int,
    scale_log2: float,
):
    blk, kv, split = ids
    d = q_ref.shape[-1]

    # 1. Tile row r is token lo + r // group_pad, query head r % group_pad of this KV head.
    row = blk_row_ref[blk]
    lo, hi = blk_lo_ref[blk], blk_hi_ref[blk]
    r = jnp.arange(tile_rows)
    tok = lo + lax.shift_right_logical(r, group_pad.bit_length() - 1)
    g = r & (group_pad - 1)
    row_ok = (tok < hi) & (g < group)
    # Masked-off rows keep distinct (possibly out-of-range) addresses: Triton never touches
    # them, and interpret mode's scatter drops them rather than racing a live row.
    heads = kv * group + g
    col = jnp.arange(d)[None, :]  # every load and store indexes with arrays (interpret mode needs that)
    q_at = (tok[:, None], heads[:, None], col)
    row_mask = jnp.broadcast_to(row_ok[:, None], (tile_rows, d))
    q = plgpu.load(q_ref.at[q_at], mask=row_mask, other=0.0).astype(k_ref.dtype)
    pos = plgpu.load(pos_ref.at[tok], mask=row_ok, other=-1)  # -1: sees nothing

    # 2. The block sees context 0..max(pos), never past seq_len; this split takes a share.
    # Blocks before `n_full` are visible to every live row: those skip all masking.
    seq_len = lens_ref[row]
    ctx_len = jnp.minimum(seq_len, jnp.max(pos) + 1)
    n_blocks = pl.cdiv(ctx_len, block_kv)
    per_split = pl.cdiv(n_blocks, num_splits)
    first = split * per_split
    last = jnp.minimum(first + per_split, n_blocks)
    min_pos = jnp.min(jnp.where(row_ok, pos, jnp.iinfo(jnp.int32).max - 1))
    n_full = jnp.minimum(seq_len, min_pos + 1) // block_kv
    mid = jnp.clip(n_full, first, last)

    # 3. Stream the context; K/V row of position c is page(c) * page_size + c % page_size.
    page_shift = page_size.bit_length() - 1

    def body(i, carry, *, masked: bool):
        acc, m, l = carry
        ctx = i * block_kv + jnp.arange(block_kv)
        live = ctx < ctx_len
        row_opts = dict(mask=live, other=0) if masked else {}
        kv_opts = dict(mask=jnp.broadcast_to(live[:, None], (block_kv, d)), other=0.0) if masked else {}
        page = plgpu.load(bt_ref.at[row, lax.shift_right_logical(ctx, page_shift)], **row_opts)
        kv_rows = page * page_size + (ctx & (page_size - 1))
        k = plgpu.load(k_ref.at[kv, kv_rows[:, None], col], **kv_opts)  # (BK, D)
        v = plgpu.load(v_ref.at[kv, kv_rows[:, None], col], **kv_opts)
        s = plgpu.dot(q, k, trans_b=True) * scale_log2  # (R, BK), log2 units
        if masked:
            s = jnp.where((ctx[None, :] <= pos[:, None]) & live[None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    init = (
        jnp.zeros((tile_rows, d), jnp.float32),
        jnp.full((tile_rows,), NO_SCORE, jnp.float32),
        jnp.zeros((tile_rows,), jnp.float32),
    )
    carry = lax.fori_loop(first, mid, functools.partial(body, masked=False), init)
    acc, m, l = lax.fori_loop(mid, last, functools.partial(body, masked=True), carry)

    # 4. The normalised output (rows that saw nothing: 0 / max(0, tiny) = 0), or this split's part.
    if num_splits == 1:
        _, o_ref = out_refs
        out = acc / jnp.maximum(l, 1e-30)[:, None]
        plgpu.store(o_ref.at[q_at], out.astype(o_ref.dtype), mask=row_mask)
    else:
        o_ref, m_ref, l_ref = out_refs
        plgpu.store(o_ref.at[(split, *q_at)], acc, mask=row_mask)
        plgpu.store(m_ref.at[split, tok, heads], m, mask=row_ok)
        plgpu.store(l_ref.at[split, tok, heads], l, mask=row_ok)


def query_block_schedule(
    query_start_loc: Int[Array, " B1"], num_tokens: int, block_q: int
) -> tuple[Int[Array, " NQ"], Int[Array, " NQ"], Int[Array, " NQ"]]:
    """Split every row's tokens into blocks of at most block_q: (row, lo, hi) per block.

    sum_b ceil(n_b / block_q) <= T // block_q + B, and a used block holds a token, so
    min(T // block_q + B, T) blocks always suffice; unused blocks get lo == hi == 0.
    """
    b = query_start_loc.shape[0] - 1
    counts = (query_start_loc[1:] - query_start_loc[:-1] + block_q - 1) // block_q  # (B,)
    ends = jnp.cumsum(counts)
    blk = jnp.arange(min(num_tokens // block_q + b, num_tokens))
    # compare_all: one fused comparison, where the default binary search is a loop of small launches
    row = jnp.searchsorted(ends, blk, side="right", method="compare_all")  # == B when unused
    used = row < b
    row = jnp.minimum(row, b - 1)
    lo = query_start_loc[row] + (blk - (ends[row] - counts[row])) * block_q
    hi = jnp.minimum(lo + block_q, query_start_loc[row + 1])
    lo, hi = jnp.where(used, lo, 0), jnp.where(used, hi, 0)
    return row.astype(jnp.int32), lo.astype(jnp.int32), hi.astype(jnp.int32)


def num_splits_for(programs: int, max_ctx: int, block_kv: int) -> int:
    """Context splits so that programs * splits fills the GPU (1 for large batches)."""
    if programs >= TARGET_PROGRAMS:
        return 1
    return max(1, min(-(-TARGET_PROGRAMS // programs), -(-max_ctx // block_kv), MAX_SPLITS))


def _tile(config: KernelConfig, group: int) -> tuple[int, int, int]:
    """(tile rows, padded group, tokens per query block) of a config for this GQA group."""
    group_pad = next_pow2(group)
    tile_rows = max(config.tile_rows, MIN_DOT_ROWS, group_pad)
    return tile_rows, group_pad, tile_rows // group_pad


def paged_attention_kernel(
    q: Float[Array, "T H D"],
    k_pages: Float[Array, "KV N S D"],
    v_pages: Float[Array, "KV N S D"],
    meta,
    *,
    scale: float,
    config: KernelConfig,
    interpret: bool = False,
) -> Float[Array, "T H D"]:
    """One launch under an explicit configuration (the benchmark sweeps these)."""
    t, h, d = q.shape
    kv_heads, n_pages, page_size, _ = k_pages.shape
    group = h // kv_heads
    tile_rows, group_pad, block_q = _tile(config, group)
    qsl = meta.query_start_loc
    blk_row, blk_lo, blk_hi = query_block_schedule(qsl, t, block_q)
    num_blocks = blk_row.shape[0]
    max_ctx = meta.block_tables.shape[1] * page_size
    splits = config.num_splits or num_splits_for(num_blocks * kv_heads, max_ctx, config.block_kv)

    short_rows = config.short_rows and max(config.short_rows, MIN_DOT_ROWS, group_pad)
    kernel = functools.partial(
        _kernel,
        tile_rows=tile_rows,
        short_rows=short_rows,
        group=group,
        group_pad=group_pad,
        page_size=page_size,
        block_kv=config.block_kv,
        num_splits=splits,
        scale_log2=scale * LOG2E,
    )
    args = (
        q,
        k_pages.reshape(kv_heads, n_pages * page_size, d),
        v_pages.reshape(kv_heads, n_pages * page_size, d),
        meta.block_tables,
        meta.seq_lens,
        meta.positions,
        blk_row,
        blk_lo,
        blk_hi,
    )
    call = functools.partial(
        pl.pallas_call,
        kernel,
        grid=(num_blocks, kv_heads, splits),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name=f"paged_attention_r{tile_rows}_k{config.block_kv}_s{splits}",
    )
    if splits == 1:
        zeros = jnp.zeros((t, h, d), q.dtype)  # tokens no block covers keep these
        out_shape = jax.ShapeDtypeStruct((t, h, d), q.dtype)
        return call(out_shape=out_shape, input_output_aliases={len(args): 0})(*args, zeros)

    out_shape = (
        jax.ShapeDtypeStruct((splits, t, h, d), jnp.float32),
        jax.ShapeDtypeStruct((splits, t, h), jnp.float32),
        jax.ShapeDtypeStruct((splits, t, h), jnp.float32),
    )
    o, m, l = call(out_shape=out_shape)(*args)  # (S, T, H, D), (S, T, H), (S, T, H)
    weight = jnp.exp2(m - jnp.max(m, axis=0))  # 0 for empty splits unless all are
    total = jnp.sum(l * weight, axis=0)
    out = jnp.sum(o * weight[..., None], axis=0) / jnp.maximum(total, 1e-30)[..., None]
    token = jnp.arange(t)
    covered = (token >= qsl[0]) & (token < qsl[-1])  # the rest were never written
    return jnp.where(covered[:, None, None], out, 0.0).astype(q.dtype)


def paged_attention(
    q: Float[Array, "T H D"],
    k_pages: Float[Array, "KV N S D"],
    v_pages: Float[Array, "KV N S D"],
    meta,
    *,
    scale: float,
    interpret: bool = False,
) -> Float[Array, "T H D"]:
    """Causal paged attention; the configuration follows the static shapes (T <= B: decode)."""
    if not supports(q, k_pages):
        return reference.paged_attention(q, k_pages, v_pages, meta, scale=scale)
    config = DECODE if q.shape[0] <= meta.seq_lens.shape[0] else PREFILL
    return paged_attention_kernel(q, k_pages, v_pages, meta, scale=scale, config=config, interpret=interpret)
