"""A layer's projections with the work around them: residual + (prologue(x) @ w + bias).

NOTE: every weight product of a decoder layer is this one op. The prologue is the
RMSNorm before it or the SwiGLU of the gate/up halves; the epilogue the bias and
the residual add. The op is chosen by `backend`:

- "xla": the ops as written (`reference.fused_matmul`); XLA fuses what it can and,
  on a mesh, splits the product by the weight's sharding and adds the all-reduce.
- "pallas": on steps of at most `pallas_matmul.MAX_ROWS` tokens, one Pallas kernel
  per projection with the prologue and epilogue inside (`models/kernels/pallas_matmul.py`);
  larger steps take the "xla" op. On a mesh it runs under `shard_map`, each device
  on its own rows and its own slice of the weight; when that slice is a slice of the
  contraction (o over heads, down over the FFN), the partial products are summed
  across the model axis before the bias and residual are added.
"""

import math

import jax
from jax.sharding import Mesh

from models.kernels import pallas_matmul, reference
from sharding.rules import logical_to_spec

BACKENDS = ("xla", "pallas")
_OPERANDS = ("norm_weight", "bias", "residual")  # the optional arrays beside x and w


def _pallas(x, w, *, norm_weight, eps, swiglu, bias, residual, interpret=False):
    """The kernel on x's rows and w flattened to (contraction, columns)."""
    c = x.ndim - (2 if swiglu else 1)
    t, out_shape = x.shape[0], w.shape[c:]
    k, n = math.prod(w.shape[:c]), math.prod(out_shape)
    out = pallas_matmul.fused_matmul(
        x.reshape(t, 2, k) if swiglu else x.reshape(t, k),
        w.reshape(k, n),
        norm_weight=norm_weight,
        eps=eps,
        swiglu=swiglu,
        bias=None if bias is None else bias.reshape(n),
        residual=None if residual is None else residual.reshape(t, n),
        interpret=interpret,
    )
    return out.reshape(t, *out_shape)


def project(
    x: jax.Array,
    w: jax.Array,
    w_axes: tuple[str | None, ...],
    *,
    backend: str = "xla",
    mesh: Mesh | None = None,
    norm_weight: jax.Array | None = None,
    eps: float = 1e-6,
    swiglu: bool = False,
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """residual + (prologue(x) @ w + bias) over the step's T tokens (see `reference.fused_matmul`).

    x is (T, *in), or (T, 2, *in) with `swiglu`; w is (*in, *out) with logical axes `w_axes`;
    the result is (T, *out). `norm_weight` (RMSNorm first) needs a single, unsplit `in` axis.
    `interpret` runs the Pallas kernel in interpret mode (on the CPU, for tests).
    """
    kw = dict(norm_weight=norm_weight, eps=eps, swiglu=swiglu, bias=bias, residual=residual)
    if backend == "xla":
        return reference.fused_matmul(x, w, **kw)
    if backend != "pallas":
        raise ValueError(f"unknown matmul backend {backend!r}; known: {BACKENDS}")
    if mesh is None:
        return _pallas(x, w, **kw, interpret=interpret)

    c = x.ndim - (2 if swiglu else 1)
    in_axes, out_axes = w_axes[:c], w_axes[c:]
    w_spec = logical_to_spec(w_axes, w.shape, mesh)
    summed = tuple(a for a in w_spec[:c] if a is not None)  # mesh axes the contraction is split over
    if summed and norm_weight is not None:
        raise ValueError(f"RMSNorm needs whole rows; the contraction axes {in_axes} are split over {summed}")
    x_axes = ("batch", None, *in_axes) if swiglu else ("batch", *in_axes)
    out_spec = logical_to_spec(("batch", *out_axes), (x.shape[0], *w.shape[c:]), mesh)
    args = {name: kw[name] for name in _OPERANDS if kw[name] is not None}
    arg_axes = {"norm_weight": in_axes, "bias": out_axes, "residual": ("batch", *out_axes)}
    arg_specs = {name: logical_to_spec(arg_axes[name], a.shape, mesh) for name, a in args.items()}

    def local(x, w, args):
        fused = {} if summed else args  # a split contraction is summed before the bias and the residual
        out = _pallas(x, w, eps=eps, swiglu=swiglu, interpret=interpret, **(dict.fromkeys(_OPERANDS) | fused))
        if not summed:
            return out
        out = jax.lax.psum(out, summed)
        out = out if "bias" not in args else out + args["bias"]
        return out if "residual" not in args else args["residual"] + out

    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(logical_to_spec(x_axes, x.shape, mesh), w_spec, arg_specs),
        out_specs=out_spec,
        check_vma=False,  # kernels (pallas_call) carry no replication types
    )(x, w, args)
