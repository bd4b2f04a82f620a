"""Head layouts for a model axis that does not divide the heads: every query head stays with its KV head."""

import numpy as np
import pytest

from sharding import head_layout

CASES = [(6, 2, 2), (6, 2, 4), (6, 2, 8), (9, 3, 2), (9, 3, 4), (9, 3, 6), (32, 8, 2), (32, 8, 16), (64, 8, 16), (4, 4, 3)]


@pytest.mark.parametrize(("h", "k", "tp"), CASES)
def test_layout_keeps_groups_on_their_shard(h, k, tp):
    lay = head_layout(h, k, tp)
    hs, ks = lay.served_heads, lay.served_kv_heads
    assert hs % tp == 0 and ks % tp == 0 and hs % ks == 0
    group, served_group = h // k, hs // ks
    for j, q in enumerate(lay.q_index):
        kv = lay.kv_index[j // served_group]  # the KV head served query head j reads
        if q >= 0:
            assert kv == q // group, (j, q, kv)  # ... is the one its checkpoint head reads
        assert j // (hs // tp) == (j // served_group) // (ks // tp)  # ... and sits on the same shard
    assert sorted(q for q in lay.q_index if q >= 0) == list(range(h))  # every query head once
    assert set(range(k)) <= set(lay.kv_index)


def test_identity_when_tp_divides_kv_heads():
    lay = head_layout(32, 8, 4)
    assert lay.is_identity and lay.served_heads == 32 and lay.served_kv_heads == 8
    x = np.ones((4, 32, 2))
    assert lay.pad(("embed", "heads", "head_dim"), x) is x


def test_smollm2_on_two_devices_pads():
    lay = head_layout(9, 3, 2)
    assert lay.kv_index == (0, 1, 2, -1)
    assert lay.q_index == (0, 1, 2, 3, 4, 5, 6, 7, 8, -1, -1, -1)
    assert "tp=2 does not divide the 3 KV heads" in lay.describe() and "[1, 3]" in lay.describe()
    w = np.arange(2 * 9 * 1, dtype=np.float32).reshape(2, 9, 1) + 1
    padded = lay.pad(("embed", "heads", "head_dim"), w)
    assert padded.shape == (2, 12, 1)
    np.testing.assert_array_equal(padded[:, :9], w)
    np.testing.assert_array_equal(padded[:, 9:], 0)


def test_replication_copies_kv_heads():
    lay = head_layout(6, 2, 4)
    assert lay.kv_index == (0, 0, 1, 1)
    kv = np.array([[[1.0], [2.0]]])  # (E=1, K=2, D=1)
    np.testing.assert_array_equal(lay.pad(("embed", "kv_heads", "head_dim"), kv)[0, :, 0], [1, 1, 2, 2])


@pytest.mark.parametrize(("h", "k", "tp"), CASES)
def test_fused_qkv_gathers_as_q_k_and_v_apart(h, k, tp):
    """A (E, K, G + 2, D) q/k/v weight comes out as q, k and v each laid out alone, then regrouped."""
    lay = head_layout(h, k, tp)
    e, d, g = 2, 3, h // k
    rng = np.random.default_rng(0)
    q, kk, v = (rng.normal(size=(e, n, d)) + 1 for n in (h, k, k))  # + 1: no weight is zero
    fused = np.concatenate([q.reshape(e, k, g, d), kk[:, :, None], v[:, :, None]], axis=2)
    axes = ("embed", "kv_heads", "qkv", "head_dim")
    served = lay.pad(axes, fused)
    assert served.shape == lay.served_shape(axes, fused.shape) == (e, lay.served_kv_heads, lay.served_group + 2, d)
    sq = lay.pad(("embed", "heads", "head_dim"), q).reshape(e, lay.served_kv_heads, lay.served_group, d)
    skv = [lay.pad(("embed", "kv_heads", "head_dim"), x)[:, :, None] for x in (kk, v)]
    np.testing.assert_array_equal(served, np.concatenate([sq, *skv], axis=2))
