"""Helpers for tests and notebooks: run one sequence through the paged path and get all its logits."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import AttentionMetadata
from models.kv_cache import allocate_kv_cache


def single_sequence_metadata(num_tokens: int, page_size: int) -> AttentionMetadata:
    """Metadata for one sequence prefilled from position 0 into pages 1, 2, ... (page 0 is trash)."""
    num_pages = -(-num_tokens // page_size)
    pages = np.arange(1, num_pages + 1, dtype=np.int32)
    pos = np.arange(num_tokens, dtype=np.int32)
    return AttentionMetadata(
        positions=jnp.asarray(pos),
        slot_mapping=jnp.asarray(pages[pos // page_size] * page_size + pos % page_size),
        token_seq=jnp.zeros(num_tokens, jnp.int32),
        block_tables=jnp.asarray(pages[None, :]),
        seq_lens=jnp.asarray([num_tokens], jnp.int32),
        query_start_loc=jnp.asarray([0, num_tokens], jnp.int32),
    )


def forward_dense(model, token_ids, page_size: int = 16) -> np.ndarray:
    """(T, V) float32 logits of every position of one sequence, computed through the paged KV cache."""
    tokens = np.asarray(token_ids, dtype=np.int32)
    cfg = model.config
    meta = single_sequence_metadata(len(tokens), page_size)
    num_pages = 1 + meta.block_tables.shape[1]
    dtype = model.embed[...].dtype
    cache = allocate_kv_cache(cfg, num_pages, page_size, dtype)

    @nnx.jit
    def run(model, tokens, cache, fields):
        hidden, _ = model(tokens, cache, AttentionMetadata(**fields))  # built inside: jit only sees arrays
        return model.logits(hidden)

    fields = {k: getattr(meta, k) for k in meta.__dataclass_fields__}
    return np.asarray(jax.device_get(run(model, jnp.asarray(tokens), cache, fields)), dtype=np.float32)
