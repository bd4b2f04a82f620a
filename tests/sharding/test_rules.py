"""The logical-axis rules table and placing arrays by it."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from models.kv_cache import CACHE_AXES
from sharding import Placement, head_layout, logical_to_spec, make_mesh


def test_rules_table():
    assert logical_to_spec(("vocab", "embed")) == P("model", None)
    assert logical_to_spec(("embed", "heads", "head_dim")) == P(None, "model", None)
    assert logical_to_spec(("embed", "kv_heads", "head_dim")) == P(None, "model", None)
    assert logical_to_spec(("embed", "mlp")) == P(None, "model")
    assert logical_to_spec(CACHE_AXES) == P("model", "data", None, None)
    assert logical_to_spec(("batch", None)) == P("data", None)
    assert logical_to_spec(None) == P()


def test_unknown_axis_names_the_known_ones():
    with pytest.raises(KeyError, match="'experts' has no sharding rule; known:.*'heads'"):
        logical_to_spec(("experts", "embed"))


def test_dimension_the_mesh_does_not_divide_is_replicated():
    mesh = make_mesh(1, 4)
    assert logical_to_spec(("vocab", "embed"), (49155, 64), mesh) == P(None, None)
    assert logical_to_spec(("vocab", "embed"), (49152, 64), mesh) == P("model", None)


def test_placement_puts_each_shard_on_its_device():
    mesh = make_mesh(2, 2)
    place = Placement(mesh, head_layout(9, 3, 2))
    w = np.random.default_rng(0).normal(size=(8, 9, 4)).astype(np.float32)
    x = place(("layers", 0, "attn", "q"), ("embed", "heads", "head_dim"), w)
    assert x.shape == (8, 12, 4) and x.sharding.spec == P(None, "model", None)
    for shard in x.addressable_shards:
        assert shard.data.shape == (8, 6, 4)
    np.testing.assert_array_equal(np.asarray(x)[:, :9], w)
    # the same array made on device in the checkpoint layout comes out identical
    y = place.put(("embed", "heads", "head_dim"), jax.device_put(w))
    assert y.sharding.is_equivalent_to(x.sharding, 3)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))


def test_random_weights_drawn_in_shards_all_live_on_the_mesh(monkeypatch):
    """Models too large for one device are drawn shard by shard: every array, the RoPE
    frequencies included, must sit on the mesh (a stray one-device array fails at compile)."""
    from flax import nnx

    import models.loading
    from models.config import ModelConfig

    monkeypatch.setattr(models.loading, "DRAW_IN_SHARDS_BYTES", 0)
    mesh = make_mesh(1, 2)
    model = models.loading.random_model(ModelConfig.tiny(), "float32", place=Placement(mesh))
    for path, x in nnx.to_flat_state(nnx.state(model)):
        assert x.get_value().sharding.device_set == set(mesh.devices.flat), path
