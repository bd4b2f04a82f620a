"""Pallas GPU (Triton back end): the projections of a small decode step, with the work around them.

NOTE: a decode step of a few rows reads every weight once and does little else, so
its time is the weights' bytes plus a launch and a ramp for every kernel. Left to
XLA, a layer is thirteen kernels; four of them are the projections, the rest mostly
tiny. This kernel folds the tiny ones into the projections:

    qkv     = rmsnorm(x) @ W_qkv            the norm in the prologue
    x'      = x + attn @ W_o                the residual add in the epilogue
    gate_up = rmsnorm(x') @ W_gate_up
    x''     = x' + swiglu(gate_up) @ W_down  SwiGLU in the prologue, the add in the epilogue

RMSNorm is a per-row scale, so it commutes with the product: rmsnorm(x) @ W =
r * ((x * g) @ W) with r = rsqrt(mean(x^2) + eps), and the sum of squares is taken
from the same blocks of x the product reads. A program owns `block_n` output
columns and loops over the whole contraction, so no partial sums cross programs
(no split-K reduce); `block_n` is small enough that the columns make about one
program per SM, and no narrower than 32 (64-byte rows of the weight). Rows are the step's tokens, padded to a power of two >= 16 (the
fewest Triton's tensor-core products take).

The reference is `reference.fused_matmul`. Measured on an H100 it is slower than XLA's
GEMMs (most of all where the prologue rewrites the dot's operand: SwiGLU, the norm's
gain), so the engine uses it only when asked (`--matmul-backend pallas`); the figures and
what might close the gap are in benchmarks/NOTES-matmul.md.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxtyping import Array, Float

from models.kernels import reference
from models.kernels.pallas_gpu import is_pow2

MAX_ROWS = 64  # steps with more tokens than this run through XLA's GEMMs
TARGET_PROGRAMS = 128  # output-column blocks to aim for (an H100 has 132 SMs)
MAX_BLOCK_K = 256
WEIGHT_TILE = 256 * 64  # weight elements a loop step loads: at most 32 KB of bf16
NUM_STAGES = 4  # loop steps whose loads are in flight at once (Triton's software pipelining)
SMEM_BUDGET = 160 * 1024  # shared memory the stages may take (an H100 SM has 227 KB; Triton needs some more)


def block_n_for(n: int) -> int:
    """Columns per program: the widest of 128, 64, 32 that still gives TARGET_PROGRAMS programs (rows of
    64 bytes and more, whole DRAM bursts), narrowed to a power of two >= 16 that divides n (0: none)."""
    b = 128
    while b > 32 and n // b < TARGET_PROGRAMS:
        b //= 2
    while b >= 16 and n % b:
        b //= 2
    return b if b >= 16 else 0


def stage_bytes(rows: int, block_k: int, block_n: int, swiglu: bool, itemsize: int = 2) -> int:
    """Shared memory one pipeline stage holds: a block of x (both halves with SwiGLU) and one of the weight."""
    return itemsize * block_k * (rows * (2 if swiglu else 1) + block_n)


def block_k_for(k: int, block_n: int, rows: int = 16, swiglu: bool = False) -> int:
    """Contraction per loop step: the widest power of two >= 16 that divides k and keeps the weight
    block within WEIGHT_TILE and, down to 64, NUM_STAGES stages within SMEM_BUDGET (0: none divides k)."""
    b = min(MAX_BLOCK_K, WEIGHT_TILE // block_n)
    while b >= 16 and (k % b or (b > 64 and NUM_STAGES * stage_bytes(rows, b, block_n, swiglu) > SMEM_BUDGET)):
        b //= 2
    return b if b >= 16 else 0


def num_stages_for(rows: int, block_k: int, block_n: int, swiglu: bool) -> int:
    """NUM_STAGES, or fewer where that many stages would overflow SMEM_BUDGET."""
    s = NUM_STAGES
    while s > 1 and s * stage_bytes(rows, block_k, block_n, swiglu) > SMEM_BUDGET:
        s -= 1
    return s


def supports(rows: int, k: int, n: int) -> bool:
    """Rows a power of two in 16..MAX_ROWS; the contraction and the columns in blocks of >= 16."""
    block_n = block_n_for(n)
    return 16 <= rows <= MAX_ROWS and is_pow2(rows) and block_n > 0 and block_k_for(k, block_n) > 0


def _kernel(*refs, norm: bool, swiglu: bool, bias: bool, residual: bool, block_n: int, block_k: int, eps: float):
    x_ref, w_ref, *rest, out_ref = refs
    g_ref = rest.pop(0) if norm else None
    bias_ref = rest.pop(0) if bias else None
    res_ref = rest.pop(0) if residual else None
    rows, k_total = out_ref.shape[0], w_ref.shape[0]
    cols = pl.ds(pl.multiple_of(pl.program_id(0) * block_n, block_n), block_n)

    def body(j, carry):
        acc, sumsq = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        if swiglu:  # x holds the gate then the up half of each row: (rows, 2 * k_total)
            g = x_ref[:, ks].astype(jnp.float32)
            u = x_ref[:, pl.ds(pl.multiple_of(k_total + j * block_k, block_k), block_k)].astype(jnp.float32)
            a = (g / (1.0 + jnp.exp(-g)) * u).astype(w_ref.dtype)
        else:
            a = x_ref[:, ks]
            if norm:
                a32 = a.astype(jnp.float32)
                sumsq = sumsq + jnp.sum(a32 * a32, axis=1)
                a = (a32 * g_ref[ks].astype(jnp.float32)[None, :]).astype(w_ref.dtype)
        acc = acc + jnp.dot(a, w_ref[ks, cols], preferred_element_type=jnp.float32)
        return acc, sumsq

    init = (jnp.zeros((rows, block_n), jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, sumsq = lax.fori_loop(0, k_total // block_k, body, init)
    if norm:
        acc = acc * lax.rsqrt(sumsq / k_total + eps)[:, None]
    if bias:
        acc = acc + bias_ref[cols].astype(jnp.float32)[None, :]
    if residual:
        acc = acc + res_ref[:, cols].astype(jnp.float32)
    out_ref[:, cols] = acc.astype(out_ref.dtype)


def fused_matmul(
    x: Float[Array, "M K"] | Float[Array, "M 2 K"],
    w: Float[Array, "K N"],
    *,
    norm_weight: Float[Array, " K"] | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    bias: Float[Array, " N"] | None = None,
    residual: Float[Array, "M N"] | None = None,
    block_k: int | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    interpret: bool = False,
) -> Float[Array, "M N"]:
    """residual + (prologue(x) @ w + bias), as `reference.fused_matmul` on 2-d weights (accumulated
    and summed in float32, rounded once); the reference where the shapes do not fit.

    The prologue is RMSNorm with `norm_weight`, or SwiGLU of x's two halves with `swiglu`.
    """
    k, n = w.shape
    rows = x.shape[0]
    if not supports(rows, k, n):
        return reference.fused_matmul(x, w, norm_weight=norm_weight, eps=eps, swiglu=swiglu, bias=bias,
                                      residual=residual)
    block_n = block_n or block_n_for(n)
    block_k = block_k or block_k_for(k, block_n, rows, swiglu)
    num_stages = num_stages or num_stages_for(rows, block_k, block_n, swiglu)
    if k % block_k or n % block_n:
        raise ValueError(f"blocks ({block_k}, {block_n}) do not tile a ({k}, {n}) weight")
    norm = norm_weight is not None
    kernel = functools.partial(_kernel, norm=norm, swiglu=swiglu, bias=bias is not None,
                               residual=residual is not None, block_n=block_n, block_k=block_k, eps=eps)
    args = [x.reshape(rows, 2 * k) if swiglu else x, w] + [a for a in (norm_weight, bias, residual) if a is not None]
    kind = "swiglu_" if swiglu else "norm_" if norm else ""
    return pl.pallas_call(
        kernel,
        grid=(n // block_n,),
        out_shape=jax.ShapeDtypeStruct((rows, n), x.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"{kind}matmul{'_add' if residual is not None else ''}_n{block_n}",
    )(*args)
