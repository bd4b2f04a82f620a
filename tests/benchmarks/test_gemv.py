"""The GEMV of `benchmarks/gemv.py`: right in interpret mode, and lowered to Triton for an H100 on the CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.gemv import gemv
from tests.models.kernels.test_gpu_lowering import lower_for_h100


@pytest.mark.parametrize("ksplit", [1, 2])
def test_gemv_matches_the_product_over_the_transposed_weight(ksplit):
    x = jax.random.normal(jax.random.key(1), (16, 512), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), (256, 512), jnp.bfloat16)  # (N, K)
    out = gemv(x, w, bn=32, bk=128, warps=4, stages=3, ksplit=ksplit, interpret=True)
    want = np.asarray(jnp.dot(x, w.T, preferred_element_type=jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-1)


def test_gemv_lowers():
    x, w = jnp.zeros((16, 4096), jnp.bfloat16), jnp.zeros((4096, 4096), jnp.bfloat16)
    text = lower_for_h100(functools.partial(gemv, bn=32, bk=256, warps=4, stages=4, ksplit=2), x, w)
    assert "gemv_n32_k256_s2" in text
