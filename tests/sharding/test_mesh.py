"""The (data, model) mesh over 8 CPU devices, and its refusals."""

import jax
import pytest

from sharding import MeshError, make_mesh


def test_mesh_axes_and_device_order():
    mesh = make_mesh(dp=2, tp=4)
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": 2, "model": 4}
    # a tensor-parallel group is a run of neighbouring devices
    assert [[d.id for d in row] for row in mesh.devices] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_mesh_uses_the_first_devices():
    mesh = make_mesh(dp=1, tp=2)
    assert list(mesh.devices.flat) == jax.devices()[:2]


@pytest.mark.parametrize(("dp", "tp", "message"), [
    (3, 3, r"dp=3 x tp=3 needs 9 devices, but 8 cpu devices are visible; choose dp and tp with dp \* tp <= 8"),
    (0, 1, r"dp must be a positive integer \(got 0\)"),
    (1, -2, r"tp must be a positive integer \(got -2\)"),
])
def test_mesh_refusals_name_the_numbers(dp, tp, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(dp, tp)
