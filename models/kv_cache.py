"""The KV cache: per layer, K and V pages shaped (kv_heads, num_pages, page_size, head_dim).

Allocated zero-filled (uninitialised pages can hold NaNs, and 0 * NaN leaks into
attention through masked positions) and already placed where the step expects it.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from models.config import ModelConfig

CACHE_AXES = ("kv_heads", "pages", None, None)  # logical axes of one K or V array


def kv_cache_bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes one page costs across all layers, K and V."""
    return 2 * cfg.num_layers * cfg.num_kv_heads * page_size * cfg.head_dim * jnp.dtype(dtype).itemsize


def allocate_kv_cache(
    cfg: ModelConfig,
    num_pages: int,
    page_size: int,
    dtype,
    sharding: jax.sharding.Sharding | None = None,
) -> list[tuple[jax.Array, jax.Array]]:
    """Zero-filled pages for every layer, created directly with `sharding` (no host copy)."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
    make: Callable[[], jax.Array] = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
    return [(make(), make()) for _ in range(cfg.num_layers)]
