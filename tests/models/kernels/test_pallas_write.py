"""The Pallas RoPE + KV-write kernel, run on the CPU (interpret=True), against the jnp reference.

Each case draws a step's fused q/k/v projection, positions across the RoPE range,
distinct slots over pages filled with random data, and padding tokens that write
to the trash page (page 0). The kernel must rotate q and k as the reference does,
write k and v at exactly those slots, and leave every other slot as it was.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kernels import pallas_write, reference


@pytest.mark.parametrize(
    "tokens, kv_heads, group, head_dim, page_size, pad_tokens, dtype",
    [
        (16, 8, 4, 128, 16, 15, jnp.bfloat16),  # a batch-1 decode bucket of the Llama-3-8B shape
        (37, 3, 3, 64, 16, 0, jnp.float32),  # a group that is not a power of two, a ragged last block
        (70, 2, 1, 32, 32, 6, jnp.float32),  # no GQA, several token blocks
        (9, 1, 8, 64, 16, 2, jnp.bfloat16),  # one KV head, a group wider than half a tile
    ],
)
def test_matches_reference(tokens, kv_heads, group, head_dim, page_size, pad_tokens, dtype):
    rng = np.random.default_rng(tokens)
    live = tokens - pad_tokens
    n_pages = 1 + -(-live // page_size) + 2
    slots = np.concatenate([rng.permutation(np.arange(page_size, n_pages * page_size))[:live],
                            rng.integers(0, page_size, pad_tokens)])  # padding writes the trash page
    positions = np.concatenate([rng.integers(0, 8192, live), np.zeros(pad_tokens, np.int64)])
    qkv = jnp.asarray(rng.normal(size=(tokens, kv_heads, group + 2, head_dim)), dtype)
    k_pages, v_pages = (jnp.asarray(rng.normal(size=(kv_heads, n_pages, page_size, head_dim)), dtype) for _ in "kv")
    inv_freq = jnp.asarray(500000.0 ** (-np.arange(0, head_dim, 2) / head_dim), jnp.float32)
    cos, sin = reference.rope_tables(jnp.asarray(positions, jnp.int32), inv_freq)
    args = (qkv, k_pages, v_pages, jnp.asarray(slots, jnp.int32), cos, sin)

    q, k, v = jax.jit(functools.partial(pallas_write.rope_and_write, interpret=True))(*args)
    ref_q, ref_k, ref_v = jax.jit(reference.rope_and_write)(*args)

    assert q.shape == (tokens, kv_heads * group, head_dim) and q.dtype == dtype
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    f32 = functools.partial(np.asarray, dtype=np.float32)
    np.testing.assert_allclose(f32(q), f32(ref_q), **tol)
    written = np.zeros((n_pages, page_size), bool).reshape(-1)
    written[slots[:live]] = True
    written = written.reshape(n_pages, page_size)
    for out, ref, before in ((k, ref_k, k_pages), (v, ref_v, v_pages)):
        # page 0 is the trash page: padding tokens race to it, so only the others are compared
        np.testing.assert_allclose(f32(out)[:, 1:], f32(ref)[:, 1:], **tol)
        kept = ~written[1:]
        np.testing.assert_array_equal(f32(out)[:, 1:][:, kept], f32(before)[:, 1:][:, kept])  # the rest untouched


def test_backend_falls_back_to_the_reference_for_odd_head_dims():
    """A head_dim that is not a power of two goes to the reference (Triton tensors are powers of two)."""
    qkv = jnp.ones((4, 2, 3, 24), jnp.float32)
    pages = jnp.zeros((2, 3, 16, 24), jnp.float32)
    assert not pallas_write.supports(qkv, pages)
    slots = jnp.arange(16, 20)
    cos, sin = reference.rope_tables(jnp.arange(4), jnp.ones(12, jnp.float32))
    out = pallas_write.rope_and_write(qkv, pages, pages, slots, cos, sin, interpret=True)
    ref = reference.rope_and_write(qkv, pages, pages, slots, cos, sin)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
