"""Paged attention: the metadata a step carries, the KV-cache layout, and the op.

NOTE: a step is a flat, ragged batch of T tokens from B sequences (no prefill or
decode mode). Each sequence's context lives in fixed-size pages of the KV cache;
its block table lists them in order. A token at position p of its sequence sees
context positions 0..p (causal), all read through the block table.

KV cache of one layer, for K and for V alike (page 0 is the trash page that
padded tokens write to, never read by a real sequence):

    k[kv_head, page, slot, :]   shape (KV, N, S, D)
          page 0      page 1      page 2 ...
        [ trash   ] [ s0 s1 .. ] [ s0 s1 .. ]      S = page_size slots per page

    block_tables[b] = [7, 2, 9, 0, 0]   -> context positions 0..S-1 in page 7,
                                           S..2S-1 in page 2, 2S..3S-1 in page 9

The op is chosen by `backend`: "reference" is pure jnp and runs anywhere; faster
kernels for particular devices live in `models/kernels/` behind the same call.
"""


from flax import struct
from jaxtyping import Array, Float, Int

from models.kernels import pallas_gpu, pallas_write, reference

KVPages = Float[Array, "KV N S D"]


@struct.dataclass
class AttentionMetadata:
    """Where each token of the step sits, and where its sequence's context lives.

    Padding tokens have token_seq pointing at a padding row whose seq_len is 0,
    and a slot_mapping inside page 0, so they write to the trash page and read nothing.
    """

    positions: Int[Array, " T"]  # position of each token in its sequence (for RoPE and the causal mask)
    slot_mapping: Int[Array, " T"]  # page * page_size + slot where each token's K/V is written
    token_seq: Int[Array, " T"]  # row of block_tables / seq_lens the token belongs to
    block_tables: Int[Array, "B P"]  # page ids of each sequence's context, in order; unused entries 0
    seq_lens: Int[Array, " B"]  # context length of each sequence once this step's tokens are written
    query_start_loc: Int[Array, " B1"]  # B + 1 offsets: tokens of row b are [qsl[b], qsl[b+1])


def rope_and_write(
    qkv: Float[Array, "T K G2 D"],
    k_pages: KVPages,
    v_pages: KVPages,
    meta: AttentionMetadata,
    rope: tuple[Float[Array, "T D2"], Float[Array, "T D2"]],
    *,
    backend: str = "reference",
) -> tuple[Float[Array, "T H D"], KVPages, KVPages]:
    """RoPE on q and k of the fused projection, and k/v written to their slots (in place when donated).

    qkv holds, per KV head, its G query heads, then its K and its V head (G2 = G + 2); `rope`
    is the step's (cos, sin) of every token's angles (`rope_tables`). Returns q (T, K * G, D)
    and the updated pages.
    """
    args = (qkv, k_pages, v_pages, meta.slot_mapping, *rope)
    if backend == "reference":
        return reference.rope_and_write(*args)
    if backend == "pallas":
        return pallas_write.rope_and_write(*args)
    raise ValueError(f"unknown attention backend {backend!r}; known: 'reference', 'pallas' (GPU)")


def paged_attention(
    q: Float[Array, "T H D"],
    k_pages: KVPages,
    v_pages: KVPages,
    meta: AttentionMetadata,
    *,
    scale: float,
    backend: str = "reference",
) -> Float[Array, "T H D"]:
    """Causal attention of each token over its sequence's paged context (GQA: H % KV == 0)."""
    if backend == "reference":
        return reference.paged_attention(q, k_pages, v_pages, meta, scale=scale)
    if backend == "pallas":
        return pallas_gpu.paged_attention(q, k_pages, v_pages, meta, scale=scale)
    raise ValueError(f"unknown attention backend {backend!r}; known: 'reference', 'pallas' (GPU)")


def attention_backend_for(platform: str) -> str:
    """The attention op used on a platform when none is asked for."""
    return "pallas" if platform in ("gpu", "cuda") else "reference"

