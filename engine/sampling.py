"""On-device sampling: one compiled function serves any mix of per-row settings.

Every batch row carries its own parameters as arrays (`SamplingTensors`), so greedy,
seeded, nucleus and penalised requests share one step. Row b's logits go through

    1. logit_bias (added) and suppress_ids (set to -inf)           process_logits
    2. penalties: repetition, then frequency, then presence         (only if history)
    3. temperature: rows with temperature 0 (or top_k 1) are greedy: argmax of 1-2
    4. top-k, then top-p (on the top-k renormalised mass), then min-p   filter_mask
    5. Gumbel-max with the row's own key, fold_in(key(seed), step)

NOTE: the random stream of a row depends only on its (seed, step), never on its
position or on the other rows, so a seeded request gives the same tokens whatever
it is batched with. Gumbel-max (argmax of logits / T + Gumbel noise) draws exactly
from softmax(logits / T) over the kept tokens without normalising anything.

Reported logprobs, as in vLLM, come from the raw model distribution,
log_softmax(logits), before bias, penalties, temperature and filters: the chosen
token's logprob and the top-20 alternatives are both read from it.

Cost on a (B, V) batch, XLA fusing the elementwise work into the passes:
  * every row, every step: a logsumexp, an argmax and one exact ranking of the
    raw logits (`top_k_exact`, the 256 + 64 + 16 best), the bias/suppress scatters
    (B x 64 and B x 16 entries), B x V threefry Gumbel draws and the min-p compare.
    The ranking gives the reported top-20 and, with the biased ids, the 256 best
    after bias and suppress (`best_processed`), among which top-k/top-p cut; one
    ranking, not two, since each is a few sorts whose launches dominate at small B;
  * only in the full sampler (`full_rank`), and only if some row's cut falls beyond
    those 256 (top_k > 256, or a nucleus wider than 256 tokens): one sort of every
    row, B x V log V, under a `lax.cond`;
  * only if history is passed (a separately traced variant): two (B, V) scatters
    of the B x H history ids (seen mask, output counts) and an elementwise pass;
    penalties move any logit, so the processed logits get a ranking of their own.

The ranking and the scatters serve only rows that ask for them, so `sample` comes in
three static variants (SAMPLERS), and a caller compiles the ones it needs and picks,
on the host, the cheapest that every row of a call allows (`sampler_for`):
  * "plain": no ranking, no scatters: a logsumexp and one Gumbel-max argmax with the
    min-p test, for rows without logprobs, logit_bias, suppressed ids or a top-k/top-p
    cut (sampling at a temperature, greedy decoding): on an H100 (8B, fused decode
    calls) it took a step from 6.02 to 5.89 ms at batch 1 and from 17.56 to 17.06 ms
    at batch 192;
  * "ranked": the candidates' ranking above, no branch;
  * "full": "ranked" plus the full sort under a `lax.cond` (`needs_full_rank`).
A row gets the same token and logprob from every variant it is allowed.

NOTE: the step's sampler has no branch. On a GPU, XLA runs a `lax.cond` by copying
its predicate to the host and blocking there until the device reaches it, so the
thread that queues calls cannot queue the next one ahead. Computing every row's
noise and candidates instead costs little beside that: on an H100 (8B, batch 192)
a fused decode step took 18.80 ms without branches against 18.98 ms with them, and
on two H200s (tp 2, batch 1) 4.57 against 4.75 ms. Only the full sort is too costly
to pay always; the runner reruns a step's rows through the full sampler (or uses a
`full_rank` fused graph) only when one of them may need it (`needs_full_rank`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.extend.random import threefry2x32_p
from jaxtyping import Array, Bool, Float, Int, UInt32

from engine.params import MAX_LOGPROBS, ParamError, SamplingParams

MAX_LOGIT_BIAS = 64  # NB: logit_bias entries a row may carry
MAX_SUPPRESS = 16  # NS: ids a row may suppress in one step (EOS + stop_token_ids under min_tokens)
GREEDY_BELOW = 1e-5  # temperatures below this are greedy (dividing by them overflows)
TOP_CANDIDATES = 256  # C: top-k/top-p cut among each row's C best tokens, without a sort, when they can
SAMPLERS = ("plain", "ranked", "full")  # the static variants of `sample`, cheapest first (module NOTE)
CHUNK = 32  # tokens per chunk in top_k_exact
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class RowParams:
    """One live row of the batch, as the runner knows it on the host."""

    params: SamplingParams
    seed: int  # the request's seed, or one the engine drew for it; reduced mod 2**32
    step: int  # tokens this sequence has generated so far (selects the draw in the stream)
    suppress_ids: Sequence[int] = ()  # ids forced to -inf this step


@struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters of one step; padding rows are greedy and neutral."""

    temperature: Float[Array, " B"]  # 0: greedy
    top_k: Int[Array, " B"]  # 0: off
    top_p: Float[Array, " B"]  # 1: off
    min_p: Float[Array, " B"]  # 0: off
    presence_penalty: Float[Array, " B"]  # 0: off
    frequency_penalty: Float[Array, " B"]  # 0: off
    repetition_penalty: Float[Array, " B"]  # 1: off
    seed: UInt32[Array, " B"]  # row's stream: fold_in(key(seed), step)
    step: Int[Array, " B"]
    bias_ids: Int[Array, "B NB"]  # logit_bias token ids; -1 pads
    bias_values: Float[Array, "B NB"]  # added to those logits; 0 pads
    suppress_ids: Int[Array, "B NS"]  # set to -inf; -1 pads

    @staticmethod
    def build(
        rows: Sequence[RowParams | None],
        batch_size: int,
        *,
        vocab_size: int | None = None,
        device: jax.Device | jax.sharding.Sharding | None = None,
    ) -> SamplingTensors:
        """Rows (None = padding) as arrays of `batch_size` rows, put on `device` in one device_put.

        With `vocab_size`, token ids outside the vocabulary are refused; without it
        they are dropped on the device. Raises ParamError (a ValueError) when a row
        has more than MAX_LOGIT_BIAS logit_bias entries.
        """
        _, fields = SamplingTensors._host(rows, batch_size, vocab_size)
        return SamplingTensors(*jax.device_put([np.ascontiguousarray(f) for f in fields], device))

    @staticmethod
    def pack(rows: Sequence[RowParams | None], batch_size: int, *, vocab_size: int | None = None) -> np.ndarray:
        """The rows as one (batch_size, PACKED_WIDTH) int32 host array (floats as their bits), which
        a step receives inside its single transfer of host inputs and `unpack`s on the device."""
        return SamplingTensors._host(rows, batch_size, vocab_size)[0]

    @staticmethod
    def unpack(packed: Int[Array, "B W"]) -> SamplingTensors:
        """Inverse of `pack`, traced inside a step."""
        cols = jnp.split(packed, _PACKED_ENDS[:-1], axis=1)
        fields = [c if dtype == np.int32 else jax.lax.bitcast_convert_type(c, dtype)
                  for c, (_, dtype, _) in zip(cols, _PACKED)]
        return SamplingTensors(*(f[:, 0] if w == 1 else f for f, (w, _, _) in zip(fields, _PACKED)))

    @staticmethod
    def _host(rows: Sequence[RowParams | None], batch_size: int,
              vocab_size: int | None) -> tuple[np.ndarray, list[np.ndarray]]:
        """The packed host array, and each field's view into it, in field order."""
        if len(rows) > batch_size:
            raise ValueError(f"{len(rows)} rows do not fit in a batch of {batch_size}")
        b = batch_size
        packed = np.empty((b, PACKED_WIDTH), np.int32)
        (temperature, top_k, top_p, min_p, presence, frequency, repetition, seed, step, bias_ids, bias_values,
         suppress_ids) = fields = [packed[:, e - w:e].view(dtype)[:, 0] if w == 1 else packed[:, e - w:e].view(dtype)
                                   for (w, dtype, _), e in zip(_PACKED, _PACKED_ENDS)]  # views into `packed`
        for f, (_, _, neutral) in zip(fields, _PACKED):
            f[...] = neutral
        def check_ids(ids: list[int], what: str):
            if vocab_size is not None and any(not 0 <= i < vocab_size for i in ids):
                raise ParamError(what, f"{what} holds token ids outside the vocabulary [0, {vocab_size})")

        live = [(i, row) for i, row in enumerate(rows) if row is not None]
        if live:  # column by column: a Python loop of numpy item writes costs ~1.5 ms at 192 rows
            at = np.fromiter((i for i, _ in live), np.int64, len(live))
            ps = [row.params for _, row in live]
            temperature[at] = [p.temperature for p in ps]
            top_k[at] = [min(max(p.top_k, 0), _INT32_MAX) for p in ps]  # any k >= vocab keeps all
            top_p[at] = [p.top_p for p in ps]
            min_p[at] = [p.min_p for p in ps]
            presence[at] = [p.presence_penalty for p in ps]
            frequency[at] = [p.frequency_penalty for p in ps]
            repetition[at] = [p.repetition_penalty for p in ps]
            seed[at] = [row.seed % 2**32 for _, row in live]
            step[at] = [row.step for _, row in live]
        for i, row in live:
            p = row.params
            if bias := p.logit_bias:
                if len(bias) > MAX_LOGIT_BIAS:
                    why = f"has {len(bias)} entries; at most {MAX_LOGIT_BIAS} are supported"
                    raise ParamError("logit_bias", f"logit_bias {why}")
                ids = [int(k) for k in bias]
                check_ids(ids, "logit_bias")
                bias_ids[i, : len(ids)] = ids
                bias_values[i, : len(ids)] = list(bias.values())
            if row.suppress_ids:
                sup = [int(s) for s in row.suppress_ids]
                if len(sup) > MAX_SUPPRESS:
                    raise ValueError(
                        f"{len(sup)} suppressed ids (EOS + stop_token_ids under min_tokens); "
                        f"at most {MAX_SUPPRESS} are supported"
                    )
                check_ids(sup, "stop_token_ids")
                suppress_ids[i, : len(sup)] = sup

        return packed, fields


# (columns, dtype, neutral value of a padding row) of each SamplingTensors field in its packed form, in field order
_PACKED = [
    (1, np.float32, 0), (1, np.int32, 0), (1, np.float32, 1), (1, np.float32, 0),  # temperature, top_k, top_p, min_p
    (1, np.float32, 0), (1, np.float32, 0), (1, np.float32, 1),  # presence, frequency, repetition penalties
    (1, np.uint32, 0), (1, np.int32, 0),  # seed, step
    (MAX_LOGIT_BIAS, np.int32, -1), (MAX_LOGIT_BIAS, np.float32, 0), (MAX_SUPPRESS, np.int32, -1),  # ids, values, ids
]
_PACKED_ENDS = np.cumsum([w for w, _, _ in _PACKED])  # each field's last column + 1
PACKED_WIDTH = int(_PACKED_ENDS[-1])  # int32 columns a row of SamplingTensors packs into


@struct.dataclass
class SampleOutput:
    """What one step hands back per row; logprobs are from the raw model distribution."""

    token_ids: Int[Array, " B"]  # the sampled token
    logprobs: Float[Array, " B"]  # log_softmax(raw logits) at the sampled token
    top_ids: Int[Array, "B K"]  # K = min(num_top_logprobs, V) most likely raw tokens, best first
    top_logprobs: Float[Array, "B K"]  # their raw logprobs


@dataclass(frozen=True)
class Vocab:
    """The slice of the vocabulary these logits hold: ids [start, start + size) of `total`.

    Inside a shard_map whose logits are split over mesh axis `axis` (tensor parallelism
    splits the lm_head's columns), every reduction over the vocabulary is a local one
    merged through a collective of (B,) or (B, k) values, so the (B, V) logits are never
    gathered; with `axis` None (`Vocab.of`'s default) it is the whole vocabulary and the
    merges are no-ops. Ties everywhere go to the lower token id, as jnp.argmax and
    lax.top_k break them on one device.
    """

    axis: str | None
    start: Int[Array, ""] | int
    size: int
    total: int

    @classmethod
    def of(cls, size: int, axis: str | None = None) -> Vocab:
        if axis is None:
            return cls(None, 0, size, size)
        return cls(axis, jax.lax.axis_index(axis) * size, size, size * jax.lax.axis_size(axis))

    def local(self, ids: Int[Array, "B N"]) -> Int[Array, "B N"]:
        """Global ids as columns of this slice; ids elsewhere (and -1 padding) map past its end,
        where scatters with mode="drop" skip them."""
        col = ids - self.start
        return jnp.where((col >= 0) & (col < self.size), col, self.size)

    def max(self, x: Float[Array, "B V"]) -> Float[Array, " B"]:
        m = jnp.max(x, axis=-1)
        return m if self.axis is None else jax.lax.pmax(m, self.axis)

    def logsumexp(self, x: Float[Array, "B V"]) -> Float[Array, " B"]:
        m = self.max(x)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        s = jnp.sum(jnp.exp(x - m[:, None]), axis=-1)
        return jnp.log(s if self.axis is None else jax.lax.psum(s, self.axis)) + m

    def take(self, x: Float[Array, "B V"], ids: Int[Array, "B *N"]) -> Float[Array, "B *N"]:
        """x at each row's global id (or ids); ids outside the vocabulary read 0."""
        col = self.local(ids.reshape(ids.shape[0], -1))  # (B, N)
        v = jnp.where(col < self.size, jnp.take_along_axis(x, jnp.minimum(col, self.size - 1), axis=-1), 0.0)
        v = v.reshape(ids.shape)
        return v if self.axis is None else jax.lax.psum(v, self.axis)

    def argmax(self, x: Float[Array, "B V"]) -> Int[Array, " B"]:
        i = jnp.argmax(x, axis=-1)
        if self.axis is None:
            return i
        v = jnp.take_along_axis(x, i[:, None], axis=-1)  # (B, 1)
        vs, ids = (jax.lax.all_gather(a, self.axis, axis=1, tiled=True) for a in (v, i[:, None] + self.start))
        return jnp.take_along_axis(ids, jnp.argmax(vs, axis=-1)[:, None], axis=-1)[:, 0]  # first shard wins ties

    def top_k(self, x: Float[Array, "B V"], k: int) -> tuple[Float[Array, "B K"], Int[Array, "B K"]]:
        """lax.top_k over the whole vocabulary (global ids): each slice's k best, then the k best of those."""
        values, ids = top_k_exact(x, min(k, self.size))
        if self.axis is None:
            return values, ids
        values, ids = (jax.lax.all_gather(a, self.axis, axis=1, tiled=True) for a in (values, ids + self.start))
        values, j = jax.lax.top_k(values, k)  # candidates are in id order per value: ties keep the lower id
        return values, jnp.take_along_axis(ids, j, axis=-1)

    def gather(self, x: Float[Array, "B V"]) -> Float[Array, "B V"]:
        """The whole rows (only where a full sort cannot be avoided)."""
        return x if self.axis is None else jax.lax.all_gather(x, self.axis, axis=1, tiled=True)


def process_logits(
    logits: Float[Array, "B V"],
    t: SamplingTensors,
    history: Int[Array, "B H"] | None = None,
    num_prompt: Int[Array, " B"] | None = None,
    vocab: Vocab | None = None,
) -> Float[Array, "B V"]:
    """Steps 1-2: logit_bias and suppress_ids, then penalties when `history` is given.

    history[b] holds row b's prompt then output ids, -1 padded; its first
    num_prompt[b] ids are the prompt. As in vLLM, repetition_penalty covers every
    seen token (prompt and output), presence and frequency only the output.
    """
    b, v = logits.shape
    vocab = vocab or Vocab.of(v)
    rows = jnp.arange(b)[:, None]  # (B, 1)
    z = logits.astype(jnp.float32)
    z = z.at[rows, vocab.local(t.bias_ids)].add(t.bias_values, mode="drop")
    z = z.at[rows, vocab.local(t.suppress_ids)].set(-jnp.inf, mode="drop")
    if history is None:
        return z
    if num_prompt is None:
        raise ValueError("penalties need num_prompt alongside history")
    ids = vocab.local(history)  # (B, H)
    is_output = jnp.arange(history.shape[1])[None, :] >= num_prompt[:, None]  # (B, H)
    seen = jnp.zeros((b, v), bool).at[rows, ids].set(True, mode="drop")  # (B, V)
    counts = jnp.zeros((b, v), jnp.float32).at[rows, jnp.where(is_output, ids, v)].add(1.0, mode="drop")
    r = t.repetition_penalty[:, None]
    z = jnp.where(seen, jnp.where(z > 0, z / r, z * r), z)
    z = z - t.frequency_penalty[:, None] * counts
    return z - t.presence_penalty[:, None] * (counts > 0)


def top_k_exact(
    x: Float[Array, "B V"], k: int, chunk: int = CHUNK
) -> tuple[Float[Array, "B K"], Int[Array, "B K"]]:
    """lax.top_k(x, k) over rows, same ids in the same tie order, without sorting whole rows.

    The k best of a row lie in the k chunks with the best maxima (ties to the lower
    index): any other chunk has k chunks ahead of it, each holding an element that
    beats all of its own. So only those k * chunk candidates are ranked. On an H100,
    (256, 128256) f32 with k = 20 takes 0.3 ms this way, 2.7 ms through lax.top_k,
    which sorts whole rows on GPU once k > 16.
    """
    b, v = x.shape
    n_chunks = -(-v // chunk)
    if n_chunks <= k:
        values, ids = jax.lax.top_k(x, k)
        return values, ids
    xc = jnp.pad(x, ((0, 0), (0, n_chunks * chunk - v)), constant_values=-jnp.inf).reshape(b, n_chunks, chunk)
    _, best = jax.lax.top_k(jnp.max(xc, axis=-1), k)  # (B, k) chunks holding the k best
    best = jnp.sort(best, axis=-1)  # index order, so ties among candidates break like lax.top_k
    cand = jnp.take_along_axis(xc, best[:, :, None], axis=1).reshape(b, k * chunk)  # (B, k * chunk)
    values, j = jax.lax.top_k(cand, k)  # (B, k)
    return values, jnp.take_along_axis(best, j // chunk, axis=-1) * chunk + j % chunk


def _top_k_top_p_threshold(
    z: Float[Array, "B V"], top_k: Int[Array, " B"], top_p: Float[Array, " B"], c: int, vocab: Vocab | None = None,
    best: Float[Array, "B C"] | None = None,
) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """The smallest logit each row keeps under top-k then top-p, ranking only its c best.

    `best` are those c best values of z, descending, when the caller has them (`best_processed`).
    Returns the threshold and whether the c best decided it (always, when c = V):
    a row is decided if top-k cuts inside them (top-p then renormalises over the
    top-k set, all inside them) or, with top-k off, if they hold top_p of the mass.
    """
    vocab = vocab or Vocab.of(z.shape[-1])
    v = vocab.total
    if best is not None:
        s = best
    else:
        s = -jnp.sort(-vocab.gather(z), axis=-1) if c >= v else vocab.top_k(z, c)[0]  # (B, C) descending
    k = jnp.where((top_k > 0) & (top_k < v), top_k, v)  # (B,) tokens top-k keeps
    s_k = jnp.where(jnp.arange(c)[None, :] < k[:, None], s, -jnp.inf)
    log_norm = jax.nn.logsumexp(s_k, axis=-1)  # (B,) mass of the top-k set
    if c < v:
        log_norm = jnp.where(k <= c, log_norm, vocab.logsumexp(z))
    p = jnp.exp(s_k - log_norm[:, None])  # (B, C) top-k renormalised, sorted
    cum = jnp.cumsum(p, axis=-1)
    # top-p keeps the smallest prefix reaching top_p: tokens whose mass above is < top_p
    n_p = jnp.where(top_p < 1, jnp.sum(cum - p < top_p[:, None], axis=-1), v)
    n = jnp.clip(jnp.minimum(k, n_p), 1, v)  # (B,) tokens kept, at least the best
    kth = jnp.take_along_axis(s, jnp.minimum(n, c)[:, None] - 1, axis=-1)[:, 0]
    decided = (k <= c) | ((k == v) & ((top_p >= 1) | (cum[:, -1] >= top_p)))
    return jnp.where(n > c, -jnp.inf, kth), decided


def best_processed(
    z: Float[Array, "B V"], ranked_ids: Int[Array, "B R"], bias_ids: Int[Array, "B NB"], c: int,
    vocab: Vocab | None = None,
) -> Float[Array, "B C"]:
    """The c best values of z, descending, where z is the raw logits after bias and suppress_ids (then
    divided by a positive temperature, which keeps the order), given `ranked_ids`, the R = c + NB + NS
    best ids of the raw logits in order (or all of them).

    The c best of z lie among those R and the biased ids. Take an id i outside both: its z <= its
    raw logit. At most NB + NS of the R ranked ids were lowered (bias < 0, or suppressed), so at
    least c of them were not, and each such j has z_j >= raw_j >= raw_i >= z_i. A biased id that is
    also ranked, repeated, or padding counts once or not at all.
    """
    vocab = vocab or Vocab.of(z.shape[-1])
    nb = bias_ids.shape[1]
    ranked = jnp.any(bias_ids[:, :, None] == ranked_ids[:, None, :], axis=-1)  # (B, NB)
    before = jnp.arange(nb)[None, :] < jnp.arange(nb)[:, None]  # (NB, NB): j comes before i
    repeated = jnp.any((bias_ids[:, :, None] == bias_ids[:, None, :]) & before[None], axis=-1)
    outside = (bias_ids < 0) | (bias_ids >= vocab.total)
    drop = jnp.concatenate([jnp.zeros(ranked_ids.shape, bool), ranked | repeated | outside], axis=1)
    values = vocab.take(z, jnp.concatenate([ranked_ids, bias_ids], axis=1))  # (B, R + NB)
    return jax.lax.top_k(jnp.where(drop, -jnp.inf, values), c)[0]


def _min_p_mask(z: Float[Array, "B V"], min_p: Float[Array, " B"], vocab: Vocab) -> Bool[Array, "B V"]:
    """Tokens that min-p keeps (p >= min_p * p_max, i.e. z >= max(z) + log(min_p)); never those at -inf."""
    return (z > -jnp.inf) & (z >= vocab.max(z)[:, None] + jnp.log(min_p)[:, None])


def filter_mask(
    z: Float[Array, "B V"],
    top_k: Int[Array, " B"],
    top_p: Float[Array, " B"],
    min_p: Float[Array, " B"],
    *,
    candidates: int = TOP_CANDIDATES,
    vocab: Vocab | None = None,
    full_rank: bool = True,
    best: Float[Array, "B C"] | None = None,
) -> Bool[Array, "B V"]:
    """Tokens that survive top-k, top-p and min-p on temperature-scaled logits `z`.

    top-k/top-p rank the `candidates` best tokens of each row (`top_k_exact`); with
    `full_rank`, only if some row's cut falls beyond them (top_k > candidates, or a
    nucleus wider than them) are the rows sorted in full, and that row's cut read from
    the sort. Without it, no row may need that (`needs_full_rank` is false for each):
    a row whose cut the candidates leave undecided keeps all its tokens.
    min-p (p >= min_p * p_max) is the same test before or after top-k/top-p
    renormalise, since the best token is always kept: z >= max(z) + log(min_p).
    Tokens tied with the last kept one are all kept; tokens at -inf never are.
    `best`, when given, are the `candidates` best values of z, descending (see `best_processed`).
    """
    vocab = vocab or Vocab.of(z.shape[-1])
    v, c = vocab.total, min(candidates, vocab.total)
    keep = _min_p_mask(z, min_p, vocab)
    threshold, decided = _top_k_top_p_threshold(z, top_k, top_p, c, vocab, best)  # (B,)
    if full_rank and c < v:  # undecided rows alone take the sorted answer, so no row depends on its neighbours
        threshold = jax.lax.cond(
            jnp.all(decided),
            lambda: threshold,
            lambda: jnp.where(decided, threshold, _top_k_top_p_threshold(z, top_k, top_p, v, vocab)[0]),
        )
    return keep & (z >= threshold[:, None])  # rows without a cut: -inf


def needs_full_rank(params: SamplingParams, vocab_size: int, candidates: int = TOP_CANDIDATES) -> bool:
    """Whether a row's top-k/top-p cut may fall beyond its `candidates` best tokens, so that only a
    sampler with `full_rank` draws it right: top_k above them, or top-p without a top-k inside them."""
    k = params.top_k if 0 < params.top_k < vocab_size else 0
    if params.temperature < GREEDY_BELOW or k == 1 or candidates >= vocab_size:
        return False  # greedy rows take the argmax whatever the cut
    return k > candidates or (params.top_p < 1 and k == 0)


def sampler_for(row: RowParams, vocab_size: int, candidates: int = TOP_CANDIDATES) -> str:
    """The cheapest of SAMPLERS that draws `row` exactly as "full" does (penalties aside: those
    take the separate sampler with history)."""
    p = row.params
    if needs_full_rank(p, vocab_size, candidates):
        return "full"
    cut = not p.greedy and (0 < p.top_k < vocab_size or p.top_p < 1)
    return "ranked" if p.logprobs or p.logit_bias or row.suppress_ids or cut else "plain"


def _gumbel(seed: UInt32[Array, " B"], step: Int[Array, " B"], vocab: Vocab) -> Float[Array, "B V"]:
    """Row b's noise at the ids of `vocab`: jax.random.gumbel(fold_in(key(seed[b]), step[b]), (total,))
    sliced to them, drawn for those ids alone (threefry is a counter-based generator, and with
    jax's default partitionable threefry the draw of id i takes counter i)."""
    counters = (vocab.start + jnp.arange(vocab.size)).astype(jnp.uint32)  # (V,)
    tiny = jnp.finfo(jnp.float32).tiny

    def row(s, n):
        k1, k2 = jax.random.key_data(jax.random.fold_in(jax.random.key(s), n))
        b1, b2 = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counters), counters)
        mantissa = jax.lax.shift_right_logical(b1 ^ b2, jnp.uint32(9)) | jnp.uint32(0x3F800000)
        u = jax.lax.bitcast_convert_type(mantissa, jnp.float32) - 1.0  # [0, 1)
        return -jnp.log(-jnp.log(jnp.maximum(tiny, u * (1.0 - tiny) + tiny)))

    return jax.vmap(row)(seed, step)


def _sample_tokens(
    z: Float[Array, "B V"], t: SamplingTensors, vocab: Vocab, full_rank: bool, ranked_ids: Int[Array, "B R"] | None,
    rank: bool = True,
) -> Int[Array, " B"]:
    """Steps 3-5; greedy rows get no noise, and their cut always keeps their best token, so
    their token is the argmax of `z`. With `ranked_ids` (see `best_processed`) the top-k/top-p
    candidates come from that ranking of the raw logits rather than from one of their own;
    without `rank`, no row has a top-k/top-p cut (the "plain" sampler)."""
    greedy = (t.temperature < GREEDY_BELOW) | (t.top_k == 1)  # (B,)
    zt = z / jnp.where(greedy, 1.0, t.temperature)[:, None]  # (B, V)
    c = min(TOP_CANDIDATES, vocab.total)
    if rank:
        best = None if ranked_ids is None else best_processed(zt, ranked_ids, t.bias_ids, c, vocab)
        keep = filter_mask(zt, t.top_k, t.top_p, t.min_p, vocab=vocab, full_rank=full_rank, best=best)
    else:
        keep = _min_p_mask(zt, t.min_p, vocab)
    noise = jnp.where(greedy[:, None], 0.0, _gumbel(t.seed, t.step, vocab))
    return vocab.argmax(jnp.where(keep, zt + noise, -jnp.inf))


def sample(
    logits: Float[Array, "B V"],
    t: SamplingTensors,
    history: Int[Array, "B H"] | None = None,
    num_prompt: Int[Array, " B"] | None = None,
    *,
    num_top_logprobs: int = MAX_LOGPROBS,
    vocab_axis: str | None = None,
    full_rank: bool = True,
    rank: bool = True,
) -> SampleOutput:
    """Sample one token per row; jit-compatible, `num_top_logprobs`, `full_rank` and `rank` static.

    Pass `history` and `num_prompt` (see `process_logits`) only when some row uses
    penalties; without them no penalty work is traced at all. Inside a shard_map whose
    logits are split over the vocabulary on mesh axis `vocab_axis`, every shard returns
    the same whole answer (see `Vocab`). Without `full_rank` the sampler has no branch
    (see the module's NOTE) and no row may need one (`needs_full_rank`). Without `rank`
    (the "plain" sampler, `sampler_for`) nothing is ranked and no top logprobs come back
    (top_ids and top_logprobs are (B, 0)); bias and suppressed ids are not applied, so no
    row may carry them.
    """
    raw = logits.astype(jnp.float32)  # (B, V)
    vocab = Vocab.of(raw.shape[-1], vocab_axis)
    lse = vocab.logsumexp(raw)  # (B,)
    if not rank:
        if history is not None:
            raise ValueError("penalties need the ranked sampler (rank=True)")
        token_ids = _sample_tokens(raw, t, vocab, False, None, rank=False).astype(jnp.int32)
        none = jnp.zeros((raw.shape[0], 0))
        return SampleOutput(token_ids, vocab.take(raw, token_ids) - lse, none.astype(jnp.int32), none)
    z = process_logits(raw, t, history, num_prompt, vocab)
    n_top, ranked = min(num_top_logprobs, vocab.total), min(TOP_CANDIDATES + MAX_LOGIT_BIAS + MAX_SUPPRESS, vocab.total)
    if history is None and TOP_CANDIDATES < vocab.total:
        # One ranking of the raw logits gives the reported top logprobs and the top-k/top-p
        # candidates (`best_processed`); penalties move too many logits for that.
        top_values, top_ids = vocab.top_k(raw, max(n_top, ranked))  # (B, R)
        token_ids = _sample_tokens(z, t, vocab, full_rank, top_ids)
        top_values, top_ids = top_values[:, :n_top], top_ids[:, :n_top]
    else:
        token_ids = _sample_tokens(z, t, vocab, full_rank, None)
        top_values, top_ids = vocab.top_k(raw, n_top)  # (B, K)
    token_ids = token_ids.astype(jnp.int32)  # (B,)
    logprobs = vocab.take(raw, token_ids) - lse
    return SampleOutput(token_ids, logprobs, top_ids.astype(jnp.int32), top_values - lse[:, None])
