"""Every Pallas GPU kernel lowers to Triton for an H100, checked on the CPU.

Interpret mode (the other kernel tests) runs the kernels' jaxpr with jnp, so it accepts
primitives the Triton lowering lacks (a slice of a loaded block, for one): such a kernel
passes in CI and fails only on the GPU. Lowering for an abstract H100 (`lowering_platforms`)
runs the real Triton lowering without a GPU.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import ModelConfig, random_model
from models.kernels import pallas_gpu, pallas_matmul, pallas_write, reference
from models.kv_cache import allocate_kv_cache
from tests.models.kernels.test_pallas import random_step

H100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
KV, G, D, PAGE, PAGES = 8, 4, 128, 16, 64


def lower_for_h100(fn, *args) -> str:
    """The StableHLO of fn for an H100, lowered from the abstract shapes of args (no GPU needed)."""
    leaves, tree = jax.tree.flatten(args)  # as leaves: the metadata class checks its fields' types
    shapes = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",), abstract_device=H100)):
        traced = jax.jit(lambda *xs: fn(*jax.tree.unflatten(tree, xs))).trace(*shapes)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


def attention_inputs(tokens_per_row: list[int]):
    """A step of rows at context 100; spare rows as the runner pads a decode bucket, so that a step of one
    token a row has no more tokens than rows (the decode configuration) and the rest has more."""
    meta = random_step(np.random.default_rng(0), [(100, n) for n in tokens_per_row], page_size=PAGE,
                       width=16, spare_rows=5, pad_tokens=1)
    t = meta.positions.shape[0]
    pages = jnp.zeros((KV, PAGES, PAGE, D), jnp.bfloat16)
    rope = reference.rope_tables(meta.positions, jnp.ones(D // 2, jnp.float32))
    return meta, pages, rope, t


@pytest.mark.parametrize("tokens_per_row, kernel", [([1, 1, 1], r"paged_attention_r16_k64_s([2-9]|1\d)"),
                                                    ([1, 40, 7], r"paged_attention_r64_k64_s1")],
                         ids=["decode", "prefill"])
def test_paged_attention_lowers(tokens_per_row, kernel):
    """Each configuration lowers: the decode one (16-row tiles, split context) and the prefill one."""
    meta, pages, _, t = attention_inputs(tokens_per_row)
    q = jnp.zeros((t, KV * G, D), jnp.bfloat16)
    text = lower_for_h100(functools.partial(pallas_gpu.paged_attention, scale=0.1), q, pages, pages, meta)
    assert re.search(kernel, text), set(re.findall(r"paged_attention_\w+", text))


def test_rope_and_write_lowers():
    meta, pages, rope, t = attention_inputs([1, 5])
    qkv = jnp.zeros((t, KV, G + 2, D), jnp.bfloat16)
    assert "triton" in lower_for_h100(pallas_write.rope_and_write, qkv, pages, pages, meta.slot_mapping, *rope)


@pytest.mark.parametrize("prologue", ["norm", "swiglu", "residual"])
def test_fused_matmul_lowers(prologue):
    rows, k, n = 16, 512, 256
    x = jnp.zeros((rows, 2, k) if prologue == "swiglu" else (rows, k), jnp.bfloat16)
    w = jnp.zeros((k, n), jnp.bfloat16)
    extra = {"norm": {"norm_weight": jnp.ones(k, jnp.bfloat16)}, "swiglu": {},
             "residual": {"residual": jnp.zeros((rows, n), jnp.bfloat16)}}[prologue]
    fn = functools.partial(pallas_matmul.fused_matmul, swiglu=prologue == "swiglu")
    assert "triton" in lower_for_h100(lambda x, w, extra: fn(x, w, **extra), x, w, extra)


def test_model_step_lowers_with_the_gpu_kernels():
    """A whole decode step of a tiny model on the "pallas" backend: the RoPE/write and the attention
    kernels both reach the lowered step (head_dim 32: the write kernel's smallest)."""
    cfg = ModelConfig.tiny(head_dim=32)
    model = random_model(cfg, jnp.bfloat16)
    model.attention_backend = "pallas"
    graphdef, state = nnx.split(model)
    meta, _, _, t = attention_inputs([1, 1, 1])
    cache = allocate_kv_cache(cfg, PAGES, PAGE, jnp.bfloat16)

    def step(state, tokens, cache, meta):
        return nnx.merge(graphdef, state)(tokens, cache, meta)

    text = lower_for_h100(step, state, jnp.zeros(t, jnp.int32), cache, meta)
    for kernel in ("rope_and_write", "paged_attention_r16"):
        assert kernel in text, kernel
