"""The device mesh: two named axes, ("data", "model"), over the devices a run uses.

    model axis (tp) ->
    data   [ d0  d1 ]   each row holds one copy of the weights, split over its tp devices,
    axis   [ d2  d3 ]   and serves its own batch rows from its own KV-cache pages
    (dp)

The model axis is the fast-varying one, so a tensor-parallel group is made of
neighbouring devices (the same host, the same NVLink island) and its all-reduces
stay local; data-parallel rows only meet when the sampled ids come back.
"""

import jax
from jax.sharding import AxisType, Mesh

DATA = "data"  # data parallelism: batch rows and KV-cache pages
MODEL = "model"  # tensor parallelism: heads, KV heads, FFN and vocabulary


class MeshError(ValueError):
    """A mesh the devices cannot hold; the message names the sizes and what would work."""


def make_mesh(dp: int = 1, tp: int = 1, devices: list | None = None) -> Mesh:
    """A (dp, tp) mesh over the first dp * tp of `devices` (default: every device of every process).

    With several processes the mesh must use every device, since a process whose
    devices are left out would have nothing to run while the others wait on it.
    """
    for name, value in (("dp", dp), ("tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise MeshError(f"{name} must be a positive integer (got {value!r})")
    devices = list(jax.devices() if devices is None else devices)
    n, need = len(devices), dp * tp
    kind = f"{devices[0].platform} device{'s' if n > 1 else ''}" if devices else "devices"
    if need > n:
        raise MeshError(
            f"dp={dp} x tp={tp} needs {need} devices, but {n} {kind} are visible; "
            f"choose dp and tp with dp * tp <= {n}"
        )
    if jax.process_count() > 1 and need != n:
        raise MeshError(
            f"dp={dp} x tp={tp} uses {need} of the {n} devices of {jax.process_count()} processes; "
            f"with several processes every device must be used (dp * tp == {n})"
        )
    return jax.make_mesh((dp, tp), (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices[:need])
