"""Paged attention on a device mesh: each device writes and attends with its own heads over its own pages.

NOTE: the rest of the model runs under XLA's automatic partitioning: the
projections are split by their weights' shardings and XLA adds the all-reduces.
Attention cannot be left to it. Its gathers go through block tables of *local*
page ids (each data shard numbers its own pages from 0, page 0 its trash page),
and a Pallas kernel is one opaque call XLA cannot split. So RoPE with the KV
write, and the attention op, run under `shard_map`, where every device sees

    qkv          (T/dp, K/tp, G + 2, D)  its data shard's tokens, its model shard's KV groups
    K/V pages    (K/tp, N/dp, S, D)      its KV heads, its data shard's pages
    metadata     rows of its data shard: positions, local slots, local rows and page ids

which is exactly the single-device problem, so the same op serves one device or
a pod. Query heads sit with their KV heads because H/tp = (K/tp) * G
(sharding.heads pads the heads when tp does not divide K).
"""

import jax
from jax.sharding import Mesh

from models.attention import AttentionMetadata, KVPages, paged_attention, rope_and_write
from models.kv_cache import CACHE_AXES
from sharding.rules import logical_to_spec


def write_and_attend(
    qkv,  # (T, K, G + 2, D): per KV head, its query heads, its K and its V
    k_pages: KVPages,
    v_pages: KVPages,
    meta: AttentionMetadata,
    rope,  # (cos, sin) of every token's RoPE angles, each (T, D / 2)
    *,
    scale: float,
    backend: str,
    mesh: Mesh | None = None,
):
    """Rotate q and k, write this step's K/V into the cache, then attend; per shard when `mesh` is given.

    Returns the attention output (T, H, D) and the updated K and V pages.
    """

    def local(qkv, k_pages, v_pages, meta, rope):
        q, k_pages, v_pages = rope_and_write(qkv, k_pages, v_pages, meta, rope, backend=backend)
        return paged_attention(q, k_pages, v_pages, meta, scale=scale, backend=backend), k_pages, v_pages

    if mesh is None:
        return local(qkv, k_pages, v_pages, meta, rope)
    q_spec = logical_to_spec(("batch", "heads", None))
    qkv_spec = logical_to_spec(("batch", "kv_heads", None, None))
    cache_spec = logical_to_spec(CACHE_AXES)
    meta_spec = logical_to_spec(("batch",))  # a prefix: every field is split along its first axis
    return jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(qkv_spec, cache_spec, cache_spec, meta_spec, meta_spec),
        out_specs=(q_spec, cache_spec, cache_spec),
        check_vma=False,  # kernels (pallas_call) carry no replication types
    )(qkv, k_pages, v_pages, meta, rope)
