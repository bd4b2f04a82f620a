"""The model runner: the one place where a `StepPlan` becomes device arrays.

NOTE: every step is padded up to a fixed bucket (tokens T, rows B, block-table
width P) so that a small set of executables, all compiled during warm-up, serves
any plan. The step's integer metadata travels as one packed host array (one
transfer); the KV cache is donated to every call, so it is updated in place and
the runner holds the only reference to it.

Packed int32 layout of one step (offsets are static per bucket):

    [ tokens T | positions T | slots T | token_seq T | block_tables B*P | seq_lens B | qsl B+1 | logit_rows B ]
"""

import logging
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from engine.sampling import RowParams, SamplingTensors, sample
from engine.scheduler import StepPlan
from engine.sequence import Sequence
from models.attention import AttentionMetadata

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    tokens: int  # T: padded token count
    rows: int  # B: padded sequence rows (one spare row always holds the padding tokens)
    pages: int  # P: padded block-table width


@dataclass
class Sampled:
    """What one sequence got from a step."""

    token_id: int
    logprob: float
    top_ids: np.ndarray | None  # (20,) best first, when logprobs were asked for
    top_logprobs: np.ndarray | None


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


class ModelRunner:
    def __init__(self, model, kv_cache, *, page_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, token_buckets=None, page_buckets=None,
                 shardings=None):
        """`shardings` (optional) gives the placement of params, cache and step inputs on a mesh."""
        self.graphdef, self.params = nnx.split(model)
        self.kv_cache = kv_cache
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        max_pages = -(-max_model_len // page_size)
        self.token_buckets = sorted(token_buckets or _powers_of_two(min(16, max_num_batched_tokens), max_num_batched_tokens))
        self.page_buckets = sorted(set(page_buckets or [max(1, max_pages // 16), max(1, max_pages // 4), max_pages]))
        self.shardings = shardings
        self._steps: dict[Bucket, object] = {}  # compiled model steps
        self._samplers: dict[tuple[int, bool], object] = {}  # compiled samplers, by (rows, with penalties)

    # ---- compilation ---------------------------------------------------------------

    def buckets(self) -> list[Bucket]:
        return [Bucket(t, min(t, self.max_num_seqs) + 1, p) for t in self.token_buckets for p in self.page_buckets]

    def _step_fn(self, params, kv_cache, packed, bucket: Bucket):
        t, b, p = bucket.tokens, bucket.rows, bucket.pages
        sizes = [t, t, t, t, b * p, b, b + 1, b]
        tokens, positions, slots, token_seq, tables, seq_lens, qsl, rows = jnp.split(packed, np.cumsum(sizes)[:-1])
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, token_seq=token_seq,
                                 block_tables=tables.reshape(b, p), seq_lens=seq_lens, query_start_loc=qsl)
        model = nnx.merge(self.graphdef, params)
        hidden, kv_cache = model(tokens, kv_cache, meta)
        return model.logits(hidden[rows]), kv_cache  # (B, V) float32

    def _packed_len(self, bucket: Bucket) -> int:
        return 4 * bucket.tokens + bucket.rows * bucket.pages + 3 * bucket.rows + 1

    def warmup(self, progress: bool = True) -> float:
        """Compile every bucket (and the samplers for every row count). Returns seconds spent."""
        start = time.perf_counter()
        todo = self.buckets()
        rows = sorted({bk.rows for bk in todo})
        bar = tqdm(total=len(todo) + 2 * len(rows), desc="compiling", disable=not progress, unit="graph")
        step = jax.jit(self._step_fn, static_argnums=(3,), donate_argnums=(1,))
        for bucket in todo:
            packed = jax.ShapeDtypeStruct((self._packed_len(bucket),), jnp.int32)
            self._steps[bucket] = step.lower(self.params, self.kv_cache, packed, bucket).compile()
            bar.update()
        vocab = self.graphdef_vocab()
        for r in rows:
            for penalties in (False, True):
                logits = jax.ShapeDtypeStruct((r, vocab), jnp.float32)
                tensors = SamplingTensors.build([None] * r, r)
                args = (logits, tensors)
                if penalties:
                    args += (jax.ShapeDtypeStruct((r, self.max_model_len), jnp.int32),
                             jax.ShapeDtypeStruct((r,), jnp.int32))
                self._samplers[(r, penalties)] = jax.jit(sample).lower(*args).compile()
                bar.update()
        bar.close()
        return time.perf_counter() - start

    def graphdef_vocab(self) -> int:
        return nnx.merge(self.graphdef, self.params).config.vocab_size

    # ---- one step ------------------------------------------------------------------

    def _bucket_for(self, plan: StepPlan) -> Bucket:
        n_tok = plan.num_tokens
        n_pages = max(len(s.page_ids) for s in plan.seqs)
        t = next((b for b in self.token_buckets if b >= n_tok), None)
        p = next((b for b in self.page_buckets if b >= n_pages), None)
        if t is None or p is None:
            raise RuntimeError(f"step of {n_tok} tokens / {n_pages} pages exceeds every bucket")
        return Bucket(t, min(t, self.max_num_seqs) + 1, p)

    def _pack(self, plan: StepPlan, bucket: Bucket) -> np.ndarray:
        t, b, p, ps = bucket.tokens, bucket.rows, bucket.pages, self.page_size
        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.arange(t, dtype=np.int32) % ps  # padding writes into page 0, the trash page
        token_seq = np.full(t, b - 1, np.int32)  # padding tokens belong to the spare last row
        tables = np.zeros((b, p), np.int32)
        seq_lens = np.zeros(b, np.int32)
        qsl = np.zeros(b + 1, np.int32)
        rows = np.zeros(b, np.int32)
        at = 0
        for i, s in enumerate(plan.seqs):
            n = len(s.token_ids)
            pos = np.arange(s.start_pos, s.start_pos + n, dtype=np.int32)
            pages = np.asarray(s.page_ids, np.int32)
            tokens[at:at + n] = s.token_ids
            positions[at:at + n] = pos
            slots[at:at + n] = pages[pos // ps] * ps + pos % ps
            token_seq[at:at + n] = i
            tables[i, :len(pages)] = pages
            seq_lens[i] = s.start_pos + n
            rows[i] = at + n - 1
            at += n
            qsl[i + 1] = at
        qsl[len(plan.seqs) + 1:] = at
        return np.concatenate([tokens, positions, slots, token_seq, tables.ravel(), seq_lens, qsl, rows])

    def run(self, plan: StepPlan, seqs: dict[str, Sequence], suppress: dict[str, list[int]]) -> dict[str, Sampled]:
        """Execute one step; returns the sampled token of every sequence whose chunk asked for one."""
        if not plan.seqs:
            return {}
        bucket = self._bucket_for(plan)
        packed = jax.device_put(self._pack(plan, bucket))
        logits, self.kv_cache = self._steps[bucket](self.params, self.kv_cache, packed)

        row_params: list[RowParams | None] = [None] * bucket.rows
        penalties = False
        for i, s in enumerate(plan.seqs):
            if s.sample:
                seq = seqs[s.seq_id]
                row_params[i] = RowParams(seq.params, seq.seed, seq.num_output_tokens, suppress.get(s.seq_id, []))
                penalties |= seq.params.uses_penalties
        tensors = SamplingTensors.build(row_params, bucket.rows)
        args = (logits, tensors)
        if penalties:
            history = np.full((bucket.rows, self.max_model_len), -1, np.int32)
            num_prompt = np.zeros(bucket.rows, np.int32)
            for i, s in enumerate(plan.seqs):
                seq = seqs[s.seq_id]
                if s.sample and seq.params.uses_penalties:
                    ids = seq.all_token_ids
                    history[i, :len(ids)] = ids
                    num_prompt[i] = seq.num_prompt_tokens
            args += (jax.device_put(history), jax.device_put(num_prompt))
        out = self._samplers[(bucket.rows, penalties)](*args)

        want_top = any(s.sample and seqs[s.seq_id].params.logprobs for s in plan.seqs)
        token_ids, logprobs = np.asarray(out.token_ids), np.asarray(out.logprobs)
        top_ids = np.asarray(out.top_ids) if want_top else None
        top_lps = np.asarray(out.top_logprobs) if want_top else None
        result = {}
        for i, s in enumerate(plan.seqs):
            if s.sample:
                result[s.seq_id] = Sampled(
                    int(token_ids[i]), float(logprobs[i]),
                    top_ids[i] if want_top else None, top_lps[i] if want_top else None,
                )
        return result
