"""The residual add + RMSNorm kernel (models/kernels/pallas_norm.py) in interpret mode, against the jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kernels import pallas_norm, reference


@pytest.mark.parametrize("tokens,width,dtype", [(16, 4096, jnp.bfloat16), (5, 576, jnp.bfloat16), (3, 96, jnp.float32)])
def test_add_rms_norm_matches_the_reference(tokens, width, dtype):
    """Rows of any width (576 is SmolLM2's: the row is padded to 1024 inside); the sum exact, the norm
    within a rounding of the reference's (the kernel sums squares in another order)."""
    keys = jax.random.split(jax.random.key(width), 3)
    x = (jax.random.normal(keys[0], (tokens, width)) * 3).astype(dtype)
    delta = jax.random.normal(keys[1], (tokens, width)).astype(dtype)
    weight = (1 + 0.1 * jax.random.normal(keys[2], (width,))).astype(dtype)
    got_x, got_h = jax.jit(lambda *a: pallas_norm.add_rms_norm(*a, 1e-5, interpret=True))(x, delta, weight)
    want_x, want_h = reference.add_rms_norm(x, delta, weight, 1e-5)
    np.testing.assert_array_equal(np.asarray(got_x), np.asarray(want_x))
    got_h, want_h = np.asarray(got_h, np.float32), np.asarray(want_h, np.float32)
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got_h, want_h, rtol=2 * eps, atol=2 * eps)
    assert got_h.std() > 0.5  # a normalised row, not zeros
