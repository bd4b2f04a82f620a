"""The Pallas GPU paged-attention kernel, run on the CPU (interpret=True), against the jnp reference.

Each case draws a random step: rows with some context already in the cache and some
new tokens (1 for decode rows, more for prompt chunks), pages scattered at random
over a cache whose every slot (the trash page too) holds random data, so reading
past a row's context or through an unused block-table entry shows up as an error.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import AttentionMetadata, attention_backend_for
from models.kernels import pallas_gpu, reference


def random_step(
    rng: np.random.Generator,
    rows: list[tuple[int, int]],
    *,
    page_size: int,
    width: int | None = None,
    spare_rows: int = 1,
    pad_tokens: int = 0,
    pad_layout: str = "runner",
) -> AttentionMetadata:
    """Metadata for rows of (context already cached, new tokens), plus padding.

    pad_layout "runner": padding tokens sit after qsl[-1] in no row's range (as the
    runner lays them out); "rows": the last spare row owns them in query_start_loc.
    Padding tokens always have token_seq = the last spare row (seq_len 0), position 0.
    """
    b = len(rows) + spare_rows
    need = [math.ceil((c + n) / page_size) for c, n in rows]
    width = width or max(need + [1])
    pages = rng.permutation(np.arange(1, sum(need) + 1)).astype(np.int32)  # page 0 stays the trash page
    tables = np.zeros((b, width), np.int32)
    seq_lens = np.zeros(b, np.int32)
    positions, token_seq, qsl = [], [], [0]
    used = 0
    for i, ((ctx, new), n_pages) in enumerate(zip(rows, need)):
        tables[i, :n_pages] = pages[used : used + n_pages]
        used += n_pages
        seq_lens[i] = ctx + new
        positions += range(ctx, ctx + new)
        token_seq += [i] * new
        qsl.append(qsl[-1] + new)
    positions += [0] * pad_tokens
    token_seq += [b - 1] * pad_tokens
    qsl += [qsl[-1]] * spare_rows
    if pad_layout == "rows":
        qsl[-1] += pad_tokens
    t = len(positions)
    return AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32),
        slot_mapping=jnp.zeros(t, jnp.int32),  # attention reads pages only; nothing is written here
        token_seq=jnp.asarray(token_seq, jnp.int32),
        block_tables=jnp.asarray(tables),
        seq_lens=jnp.asarray(seq_lens),
        query_start_loc=jnp.asarray(qsl, jnp.int32),
    )


def random_inputs(rng, meta, *, heads, kv_heads, head_dim, page_size, dtype=jnp.bfloat16):
    t = meta.positions.shape[0]
    n_pages = int(meta.block_tables.max()) + 1 + int(rng.integers(0, 3))  # a few pages nobody owns
    key_q, key_k, key_v = jax.random.split(jax.random.key(int(rng.integers(1 << 31))), 3)
    q = jax.random.normal(key_q, (t, heads, head_dim), jnp.float32).astype(dtype)
    k = jax.random.normal(key_k, (kv_heads, n_pages, page_size, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(key_v, (kv_heads, n_pages, page_size, head_dim), jnp.float32).astype(dtype)
    return q, k, v


def relative_error(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def check(meta, *, heads, kv_heads, head_dim, page_size, seed, config=None, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    q, k, v = random_inputs(rng, meta, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, dtype=dtype)
    scale = head_dim**-0.5
    if config is None:
        kernel = functools.partial(pallas_gpu.paged_attention, scale=scale, interpret=True)
    else:
        kernel = functools.partial(pallas_gpu.paged_attention_kernel, scale=scale, config=config, interpret=True)
    out = jax.jit(kernel)(q, k, v, meta)  # one compilation is quicker than running op by op
    upcast = [x.astype(jnp.float32) for x in (q, k, v)]
    ref = jax.jit(functools.partial(reference.paged_attention, scale=scale))(*upcast, meta)
    out, ref = np.asarray(out.astype(jnp.float32)), np.asarray(ref)
    assert out.shape == ref.shape and np.isfinite(out).all()
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-5
    assert relative_error(out, ref) < tol
    in_a_row = np.arange(ref.shape[0]) < int(meta.query_start_loc[-1])
    has_context = np.asarray(meta.seq_lens)[np.asarray(meta.token_seq)] > 0
    assert (out[~(in_a_row & has_context)] == 0).all()  # padding tokens give zeros
    return out


@pytest.mark.parametrize(
    "heads, kv_heads, page_size, head_dim, seed",
    [(4, 4, 16, 32, 0), (9, 3, 32, 32, 1), (16, 4, 128, 64, 3)],
)
def test_decode(heads, kv_heads, page_size, head_dim, seed):
    """One token per row, odd lengths, partly filled pages, a padding row and padding tokens."""
    rng = np.random.default_rng(seed)
    rows = [(int(c), 1) for c in rng.integers(0, 200, size=5)] + [(2 * page_size - 1, 1)]
    meta = random_step(rng, rows, page_size=page_size, pad_tokens=2)
    check(meta, heads=heads, kv_heads=kv_heads, head_dim=head_dim, page_size=page_size, seed=seed)


@pytest.mark.parametrize(
    "heads, kv_heads, page_size, pad_layout, seed",
    [(4, 4, 16, "runner", 4), (9, 3, 64, "rows", 5), (8, 2, 32, "runner", 6)],
)
def test_mixed_prefill_and_decode(heads, kv_heads, page_size, pad_layout, seed):
    """Fresh prompts, chunks after cached context, and decode rows in one step (T > B: prefill tiles)."""
    rng = np.random.default_rng(seed)
    rows = [(0, 37), (int(rng.integers(1, 50)), 1), (2 * page_size + 3, 21), (5, 1), (0, 1), (page_size, 19), (50, 30)]
    meta = random_step(rng, rows, page_size=page_size, pad_tokens=3, pad_layout=pad_layout)
    assert meta.positions.shape[0] > meta.seq_lens.shape[0]
    check(meta, heads=heads, kv_heads=kv_heads, head_dim=32, page_size=page_size, seed=seed)


def test_prompt_chunks_in_a_decode_shaped_step():
    """T <= B with multi-token rows (a small bucket holding a prompt chunk): decode tiles, split context."""
    rng = np.random.default_rng(8)
    rows = [(61, 6), (0, 3), (7, 1)]
    meta = random_step(rng, rows, page_size=16, spare_rows=8, pad_tokens=1)
    assert meta.positions.shape[0] <= meta.seq_lens.shape[0]
    check(meta, heads=8, kv_heads=2, head_dim=32, page_size=16, seed=8)


def test_context_split_and_blocks_smaller_than_a_page():
    """Explicit split-K (some splits get no context) with 16-position blocks over 128-slot pages."""
    rng = np.random.default_rng(9)
    rows = [(100, 1), (3, 1), (0, 1), (63, 1)]
    meta = random_step(rng, rows, page_size=128, pad_tokens=1, pad_layout="rows")
    config = pallas_gpu.KernelConfig(tile_rows=16, block_kv=16, num_splits=3, num_warps=4, num_stages=2)
    check(meta, heads=6, kv_heads=2, head_dim=16, page_size=128, seed=9, config=config)


def test_float32_matches_tightly():
    """In float32 the kernel differs from the reference only by summation order (prefill tiles here)."""
    rng = np.random.default_rng(10)
    meta = random_step(rng, [(130, 5), (0, 1), (55, 30), (64, 1)], page_size=16, pad_tokens=2)
    check(meta, heads=4, kv_heads=2, head_dim=16, page_size=16, seed=10, dtype=jnp.float32)


def test_query_block_schedule_covers_every_token_once():
    qsl = jnp.asarray([0, 5, 5, 6, 23, 23, 23], jnp.int32)  # empty rows in between and at the end
    row, lo, hi = (np.asarray(a) for a in pallas_gpu.query_block_schedule(qsl, 30, 4))
    assert len(row) == min(30 // 4 + 6, 30)
    covered = np.zeros(30, int)
    for r, a, z in zip(row, lo, hi):
        assert z - a <= 4
        if z > a:
            assert qsl[r] <= a and z <= qsl[r + 1]
        covered[a:z] += 1
    assert (covered[:23] == 1).all() and (covered[23:] == 0).all()


def test_unsupported_shapes_fall_back_to_the_reference():
    rng = np.random.default_rng(11)
    meta = random_step(rng, [(9, 1), (4, 1)], page_size=16)
    q, k, v = random_inputs(rng, meta, heads=4, kv_heads=2, head_dim=24, page_size=16)
    out = pallas_gpu.paged_attention(q, k, v, meta, scale=0.2, interpret=True)
    np.testing.assert_array_equal(out, reference.paged_attention(q, k, v, meta, scale=0.2))


def test_backend_per_platform():
    assert attention_backend_for("gpu") == "pallas"
    assert attention_backend_for("cpu") == "reference"
