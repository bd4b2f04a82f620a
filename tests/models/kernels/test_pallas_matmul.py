"""The Pallas projection kernel (prologue RMSNorm or SwiGLU, epilogue bias and residual), run on the
CPU (interpret=True), against the jnp reference: alone, per shard on meshes of the 8 CPU devices,
and inside a model, whose logits must match the model's XLA projections."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from models.config import ModelConfig
from models.kernels import pallas_matmul, reference
from models.llama import LlamaForCausalLM
from models.projection import project
from models.testing import forward_dense
from sharding import make_mesh
from sharding.rules import logical_to_spec

f32 = functools.partial(np.asarray, dtype=np.float32)


def relative_error(out, ref) -> float:
    return float(np.linalg.norm(f32(out) - f32(ref)) / np.linalg.norm(f32(ref)))


def draw(rng, shape, dtype, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def uses_kernel(fn, *args) -> bool:
    return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize(
    "rows, k, n, prologue, bias, residual, dtype",
    [
        (16, 4096, 768, "norm", False, False, jnp.bfloat16),  # qkv of a batch-1 step, a slice of the 8B shape
        (32, 576, 576, None, False, True, jnp.float32),  # o of SmolLM2 (576 = 64 x 9: blocks of 64)
        (64, 256, 1536, "norm", True, False, jnp.float32),  # gate_up with a bias, the widest step
        (16, 1536, 576, "swiglu", True, True, jnp.bfloat16),  # down: SwiGLU in, bias and residual out
    ],
)
def test_matches_reference(rows, k, n, prologue, bias, residual, dtype):
    rng = np.random.default_rng(rows + k + n)
    x = draw(rng, (rows, 2, k) if prologue == "swiglu" else (rows, k), dtype)
    w = draw(rng, (k, n), dtype, k**-0.5)
    kw = {"eps": 1e-5, "swiglu": prologue == "swiglu"}
    if prologue == "norm":
        kw["norm_weight"] = draw(rng, (k,), dtype) * 0.1 + 1
    if bias:
        kw["bias"] = draw(rng, (n,), dtype)
    if residual:
        kw["residual"] = draw(rng, (rows, n), dtype)
    run = jax.jit(functools.partial(pallas_matmul.fused_matmul, interpret=True, **kw))
    assert uses_kernel(run, x, w)
    out = run(x, w)
    want = reference.fused_matmul(x.astype(jnp.float32), w.astype(jnp.float32),
                                  **{a: v.astype(jnp.float32) if hasattr(v, "astype") else v for a, v in kw.items()})
    assert out.shape == (rows, n) and out.dtype == dtype
    # bf16 operands: the kernel rounds the normalised or gated input once before the product
    assert relative_error(out, want) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("rows, k, n", [(8, 256, 256), (100, 256, 256), (16, 24, 256), (16, 256, 40)])
def test_unsupported_shapes_take_the_reference(rows, k, n):
    """Rows not a power of two in 16..64, or a contraction or width not in blocks of 16."""
    rng = np.random.default_rng(0)
    x, w, r = draw(rng, (rows, k), jnp.float32), draw(rng, (k, n), jnp.float32), draw(rng, (rows, n), jnp.float32)
    run = jax.jit(lambda x, w, r: pallas_matmul.fused_matmul(x, w, residual=r, interpret=True))
    assert not uses_kernel(run, x, w, r)
    np.testing.assert_array_equal(run(x, w, r), reference.fused_matmul(x, w, residual=r))


def test_block_sizes():
    # 8B: qkv 6144 and o/down 4096 columns in blocks of 32 (192 and 128 programs), gate_up 28672 in
    # blocks of 128 (224); SmolLM2's o (576) in blocks of 32, widths of 16 x odd in blocks of 16
    assert [pallas_matmul.block_n_for(n) for n in (6144, 4096, 28672, 576, 48, 40)] == [32, 32, 128, 32, 16, 0]
    assert [pallas_matmul.block_k_for(k, 32) for k in (4096, 14336, 576, 96, 24)] == [256, 256, 64, 32, 0]
    assert pallas_matmul.block_k_for(4096, 128) == 128  # a 128 x 128 weight block: 32 KB a stage
    # 64 rows: four stages stay within the shared-memory budget by narrowing the contraction
    # (qkv/o 256 -> 128, gate_up 128 -> 64, down with both SwiGLU halves 256 -> 128)
    assert [pallas_matmul.block_k_for(k, bn, 64, sw) for k, bn, sw in
            ((4096, 32, False), (4096, 128, False), (14336, 32, True))] == [128, 64, 128]
    budget = pallas_matmul.SMEM_BUDGET
    for rows in (16, 32, 64):
        for k, n, sw in ((4096, 6144, False), (4096, 4096, False), (4096, 28672, False), (14336, 4096, True)):
            bn = pallas_matmul.block_n_for(n)
            bk = pallas_matmul.block_k_for(k, bn, rows, sw)
            stages = pallas_matmul.num_stages_for(rows, bk, bn, sw)
            assert stages == pallas_matmul.NUM_STAGES
            assert stages * pallas_matmul.stage_bytes(rows, bk, bn, sw) <= budget
    assert pallas_matmul.num_stages_for(64, 512, 128, True) == 1  # one 256 KB stage: as few as there can be


PROJECTIONS = {  # name: (x axes, weight axes, x shape, weight shape, options)
    "qkv": (("batch", "embed"), ("embed", "kv_heads", "qkv", "head_dim"), (32, 128), (128, 4, 4, 32), ("norm", "bias")),
    "o": (("batch", "heads", "head_dim"), ("heads", "head_dim", "embed"), (32, 8, 32), (8, 32, 128), ("bias", "residual")),
    "gate_up": (("batch", "embed"), ("embed", None, "mlp"), (32, 128), (128, 2, 512), ("norm",)),
    "down": (("batch", None, "mlp"), ("mlp", "embed"), (32, 2, 512), (512, 128), ("swiglu", "bias", "residual")),
}


@pytest.mark.parametrize("dp, tp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 4), (2, 4)])
@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_project_per_shard(dp, tp, name):
    """On a mesh each device runs the kernel on its rows and its weight slice; split contractions
    (o, down) are summed across the model axis before the bias and the residual."""
    x_axes, w_axes, x_shape, w_shape, options = PROJECTIONS[name]
    mesh = make_mesh(dp, tp)
    rng = np.random.default_rng(dp * 10 + tp)

    def put(a, axes):
        return jax.device_put(a, NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh)))

    c = len(x_shape) - (2 if "swiglu" in options else 1)
    out_axes, out_shape = ("batch", *w_axes[c:]), (x_shape[0], *w_shape[c:])
    x = put(draw(rng, x_shape, jnp.float32), x_axes)
    w = put(draw(rng, w_shape, jnp.float32, np.prod(w_shape[:c]) ** -0.5), w_axes)
    kw = {}
    if "norm" in options:
        kw["norm_weight"] = put(draw(rng, w_shape[:1], jnp.float32) * 0.1 + 1, w_axes[:1])
    if "bias" in options:
        kw["bias"] = put(draw(rng, w_shape[c:], jnp.float32), w_axes[c:])
    if "residual" in options:
        kw["residual"] = put(draw(rng, out_shape, jnp.float32), out_axes)
    swiglu = "swiglu" in options

    run = jax.jit(lambda x, w, kw: project(x, w, w_axes, backend="pallas", mesh=mesh, eps=1e-5, swiglu=swiglu,
                                           interpret=True, **kw))
    assert uses_kernel(run, x, w, kw)
    out = run(x, w, kw)
    one_device = functools.partial(jax.tree.map, lambda a: jnp.asarray(np.asarray(a)))
    want = reference.fused_matmul(*one_device((x, w)), eps=1e-5, swiglu=swiglu, **one_device(kw))
    assert out.shape == out_shape
    assert out.sharding.is_equivalent_to(NamedSharding(mesh, logical_to_spec(out_axes, out_shape, mesh)), out.ndim)
    assert relative_error(out, want) < 1e-5


def test_model_logits_match_the_xla_projections(monkeypatch):
    """A tiny model (with q/k/v, o and MLP biases) through the kernel gives the logits of XLA's ops."""
    cfg = ModelConfig.tiny(hidden_size=128, intermediate_size=256, num_heads=4, num_kv_heads=2, head_dim=32,
                           qkv_bias=True, o_bias=True, mlp_bias=True)
    model = LlamaForCausalLM(cfg, jnp.float32, rngs=nnx.Rngs(0))
    for path, var in nnx.iter_graph(model):  # biases start at zero: draw them, so that a dropped one shows
        if path and str(path[-1]).endswith("bias") and isinstance(var, nnx.Param):
            var.set_value(draw(np.random.default_rng(len(path)), var.shape, jnp.float32, 0.5))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, 32)
    want = forward_dense(model, tokens)

    calls = []

    def interpreted(*args, **kw):
        calls.append(1)
        return pallas_matmul_fused(*args, interpret=True, **{k: v for k, v in kw.items() if k != "interpret"})

    pallas_matmul_fused = pallas_matmul.fused_matmul
    monkeypatch.setattr(pallas_matmul, "fused_matmul", interpreted)
    model.matmul_backend = "pallas"
    got = forward_dense(model, tokens)
    assert len(calls) == 4  # qkv, o, gate_up, down, traced once: the layers share one jit
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_engine_takes_the_backend_only_where_it_runs():
    from engine.config import EngineConfig, EngineConfigError
    from engine.engine import LLMEngine

    with pytest.raises(EngineConfigError, match="matmul_backend"):
        EngineConfig(model="tiny", matmul_backend="cublas")
    with pytest.raises(EngineConfigError, match="needs a GPU"):  # before any weight is loaded
        LLMEngine(EngineConfig(model="tiny", matmul_backend="pallas"))
