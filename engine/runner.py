"""The model runner: the one place where a `StepPlan` becomes device arrays.

NOTE: every step is padded up to a fixed bucket (tokens T, rows B, block-table
width P) so that a small set of executables, all compiled during warm-up, serves
any plan. The step's integer metadata and its rows' sampling parameters travel as
one packed host array (one transfer: each small device_put costs the host ~0.2 ms);
sampling runs inside the step, without branches (engine.sampling's NOTE); a separate
sampler reruns it on the returned logits only when a row uses penalties or may need its
whole row ranked (`needs_full_rank`). Fused decode calls come with each of the sampler's
variants (engine.sampling.SAMPLERS), the cheapest that the call's rows allow picked on
the host. The KV cache is donated to every call, so it
is updated in place and the runner holds the only reference to it.

Packed int32 layout of one step (offsets are static per bucket), one row per data shard:

    [ tokens T | positions T | slots T | token_seq T | src T | block_tables B*P | seq_lens B | qsl B+1
      | logit_rows B (| steps B, of a fused call) | sampling B*W ]

sampling holds the rows' SamplingTensors.pack (W = PACKED_WIDTH int32 columns a row).
NOTE: the host queues call N+1 before it has read call N's tokens (engine.LLMEngine.step).
A decode whose token N samples carries engine.sequence.PENDING, and src[i] >= 0 says
where token i is on the device: every call returns `last`, (dp, R) with R the most rows
of any bucket, shard d's row r holding the last token that call sampled for it, and
the next call reads `prev[d, src[i]]` (the previous call's `last`; rows keep their shard).
In a fused decode call row b decodes in the first steps[b] steps and idles after (it
reached its length).

NOTE: on a ("data", "model") mesh every array has a fixed sharding, given to the
compiled steps as explicit in/out shardings, so nothing moves or recompiles
between steps: params and the KV cache as `sharding.rules` places them, the
packed metadata (dp, L) and the sampled rows (dp * B, ...) split over the data
axis, the logits (dp * B, V) over data and (with tp) vocabulary. Data shard d runs
plans[d]: its own T tokens and B rows over its own pages, with local page ids; the
model's projections see dp * T tokens split over the data axis, and attention runs
per shard (models.sharded_attention).

With several processes (sharding.distributed), process 0 decides each step and
broadcasts its host inputs; the others execute the same step with them (`follow`).
"""

import functools
import itertools
import logging
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import broadcast_one_to_all
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from engine.sampling import PACKED_WIDTH, SAMPLERS, RowParams, SamplingTensors, needs_full_rank, sample, sampler_for
from engine.scheduler import StepPlan
from engine.sequence import PENDING, Sequence
from models.attention import AttentionMetadata
from sharding import DATA, MODEL, logical_to_spec, make_mesh, named_sharding

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bucket:
    tokens: int  # T: padded token count
    rows: int  # B: padded sequence rows (one spare row always holds the padding tokens)
    pages: int  # P: padded block-table width


@dataclass
class Call:
    """A step, or a fused decode call, queued on the device and not yet read back."""

    bucket: Bucket
    scheduled: list[tuple[int, object]]  # (sampler row, ScheduledSeq)
    out: Future  # of a SampleOutput of device arrays: (dp * B, ...) for a step, (steps, dp * B, ...) for a fused call
    want_top: bool  # some sequence asked for logprobs
    fused: bool


@dataclass
class Sampled:
    """What one sequence got from a step."""

    token_id: int
    logprob: float
    top_ids: np.ndarray | None  # (20,) best first, when logprobs were asked for
    top_logprobs: np.ndarray | None


def _powers(base: int, lo: int, hi: int) -> list[int]:
    """lo, lo * base, lo * base**2, ... below hi, then hi."""
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= base
    return out + [hi]


_STOP, _STEP = 0, 1  # commands the lead broadcasts to followers
COMPILE_THREADS = min(8, os.cpu_count() or 1)  # graphs XLA compiles at once during warm-up
LAUNCH_SWITCH_INTERVAL_S = 0.0005  # the longest the launcher thread waits for the GIL (sys.setswitchinterval)
# Under tensor parallelism a decode call is bound by launches: XLA's default command buffers (CUDA
# graphs) stop at every collective, so a step of L layers is 2L + 1 graphs queued one by one. With
# collectives inside them it is one. Measured on two H200s (8B, tp 2, batch 1): 4.57 -> 4.41 ms a
# token; the TTFT step (1024 tokens) went 22.0 -> 23.5 ms, so steps that may carry prompts keep the
# default. The list is XLA's default (jax 0.11) plus COLLECTIVES.
DECODE_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,DYNAMIC_SLICE_FUSION,COLLECTIVES"


class ModelRunner:
    def __init__(self, model, kv_cache, *, page_size: int, max_model_len: int, max_num_seqs: int,
                 max_num_batched_tokens: int, token_buckets=None, page_buckets=None, mesh: Mesh | None = None,
                 decode_steps: int = 1):
        """`mesh` (default: one device) holds the params and the cache; each of its data shards runs
        one StepPlan a step, with up to `max_num_seqs` sequences and `max_num_batched_tokens` tokens.
        `kv_cache` may be its shape (jax.ShapeDtypeStruct leaves with their shardings) for `warmup`;
        the real one must be in `self.kv_cache` before the first step."""
        self.mesh = mesh or make_mesh(1, 1)
        self.dp = self.mesh.shape[DATA]
        model.mesh = self.mesh  # attention runs per shard
        self.vocab_size = model.config.vocab_size
        self.graphdef, self.params = nnx.split(model)
        # The steps take the params as a flat list: flattening the nnx State on every call costs
        # more host time than the rest of a dispatch.
        self._param_leaves, self._param_tree = jax.tree.flatten(self.params)
        self.kv_cache = kv_cache
        self._param_shardings = [x.sharding for x in self._param_leaves]
        self._cache_shardings = jax.tree.map(lambda x: x.sharding, kv_cache)
        self._rows = named_sharding(self.mesh, ("batch",))  # leading axis split over data shards
        # Logits stay split over the vocabulary as the lm_head makes them (when tp divides it): the
        # sampler merges per-shard results (engine.sampling.Vocab) instead of gathering (B, V) rows.
        self._logit_spec = logical_to_spec(("batch", "vocab" if self.mesh.shape[MODEL] > 1 else None),
                                           (self.dp, self.vocab_size), self.mesh)
        self._logit_rows = NamedSharding(self.mesh, self._logit_spec)
        self._replicated = named_sharding(self.mesh, None)
        self._steps_rows = named_sharding(self.mesh, (None, "batch"))  # (steps, rows) of a fused call
        self._multihost = jax.process_count() > 1
        self._followers_stopped = False
        self.page_size = page_size
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        max_pages = -(-max_model_len // page_size)
        # Few buckets keep warm-up short (each is a compiled graph). Padding a decode step costs
        # little, since its matmuls are bound by reading the weights, not by the rows, except at the
        # smallest sizes: on an H100 (8B) one row padded to 16 tokens decodes in 5.86 ms a token
        # against 5.68 ms padded to 4 or 1 (every kernel of the step is shorter), hence a bucket of 4.
        self.token_buckets = sorted(token_buckets or _powers(4, min(4, max_num_batched_tokens), max_num_batched_tokens))
        # The jnp reference gathers whole block tables, so narrow tables pay on short contexts; the
        # GPU kernel reads each row up to its own length, so one width (the full one) serves all.
        default_pages = [max_pages] if model.attention_backend != "reference" else [max(1, max_pages // 16), max_pages]
        self.page_buckets = sorted(set(page_buckets or default_pages))
        if self.token_buckets[-1] < max_num_batched_tokens or self.page_buckets[-1] < max_pages:
            raise ValueError(
                f"buckets must reach max_num_batched_tokens={max_num_batched_tokens} tokens and "
                f"max_model_len={max_model_len} / page_size={page_size} = {max_pages} pages "
                f"(got token_buckets={self.token_buckets}, page_buckets={self.page_buckets})"
            )
        self._steps: dict[Bucket, object] = {}  # compiled model steps
        self._samplers: dict[int, object] = {}  # compiled full samplers (penalties, full ranking), by rows
        # Fused decode (several steps a call) pays when the host is slower than a step; not across processes.
        self.decode_steps = 1 if self._multihost else decode_steps
        # compiled fused decode steps, for buckets a decode plan uses, by (bucket, sampler variant)
        self._fused: dict[tuple[Bucket, str], object] = {}
        self.warmup_report: dict = {}  # what warm-up compiled and where its time went
        self._max_rows = max(bk.rows for bk in self.buckets())  # R of `last`
        # the `last` of the call queued most recently (launcher thread), and its rows by sequence (host)
        self._last = self._put(np.zeros((self.dp, self._max_rows), np.int32))
        self._last_rows: dict[str, int] = {}
        # NOTE: compiled calls are queued from one launcher thread, in order. On the GPU a call
        # with a branch (the full sampler, a fused call with the "full" sampler) returns only once the device
        # reaches it (XLA reads the predicate back to the host): queued from the engine's thread,
        # it would block the host work meant to overlap the device. Inline with several
        # processes: every process must queue the same collectives in the same order.
        self._launcher = None if self._multihost else ThreadPoolExecutor(1, thread_name_prefix="pagedjax-launch")
        # The launcher needs the GIL for a moment to queue each call, while the engine's thread runs
        # Python for long stretches (recording a fused call's tokens: ~16 ms at 192 rows). At
        # Python's default switch interval (5 ms) each wait for the GIL idled the GPU between
        # calls for up to that long (profile_step's timeline, batch 192 on an H100).
        sys.setswitchinterval(min(sys.getswitchinterval(), LAUNCH_SWITCH_INTERVAL_S))

    # ---- compilation ---------------------------------------------------------------

    def buckets(self) -> list[Bucket]:
        return [Bucket(t, min(t, self.max_num_seqs) + 1, p) for t in self.token_buckets for p in self.page_buckets]

    def decode_buckets(self) -> list[Bucket]:
        """The buckets a plan of decodes only (one token per sequence) can land in."""
        largest = next(t for t in self.token_buckets if t >= min(self.max_num_seqs, self.token_buckets[-1]))
        return [bk for bk in self.buckets() if bk.tokens <= largest]

    def _unpack(self, packed, prev, bucket: Bucket, fused: bool = False):
        """(dp, L) packed rows -> flat tokens (pending ones read from `prev`) and metadata over all
        shards, the logit rows, the sampling tensors (and, for a fused call, the steps field)."""
        t, b, p = bucket.tokens, bucket.rows, bucket.pages
        dp = packed.shape[0]  # packed: (dp, L), one row per data shard
        sizes = [t, t, t, t, t, b * p, b, b + 1, b] + ([b] if fused else [])
        tokens, *fields, sampling = jnp.split(packed, np.cumsum(sizes), axis=1)
        src = fields[3]  # (dp, T), rows of this shard in `prev`: the gather stays within the shard
        tokens = jnp.where(src >= 0, jnp.take_along_axis(prev, jnp.maximum(src, 0), axis=1), tokens).reshape(-1)
        positions, slots, token_seq, _, tables, seq_lens, qsl, rows, *steps = (f.reshape(-1) for f in fields)
        meta = AttentionMetadata(positions=positions, slot_mapping=slots, token_seq=token_seq,
                                 block_tables=tables.reshape(dp * b, p), seq_lens=seq_lens, query_start_loc=qsl)
        return (tokens, meta, rows, SamplingTensors.unpack(sampling.reshape(dp * b, PACKED_WIDTH)), *steps)

    def _last_of(self, token_ids):
        """`last` of a call: (dp * B,) token ids of its rows -> (dp, R), zeros past row B."""
        rows = token_ids.reshape(self.dp, -1)
        return jnp.pad(rows, ((0, 0), (0, self._max_rows - rows.shape[1])))

    def _logits(self, model, hidden, rows, bucket: Bucket):
        """(dp * B, V) float32 logits of each row's last token."""
        dp = rows.shape[0] // bucket.rows
        last = jnp.take_along_axis(hidden.reshape(dp, bucket.tokens, -1), rows.reshape(dp, bucket.rows, 1), axis=1)
        return model.logits(last.reshape(dp * bucket.rows, -1))

    def _step_fn(self, param_leaves, kv_cache, packed, prev, bucket: Bucket):
        """One step and its sampling (without penalties or full ranking), and its `last`; the logits
        come back too, for the full sampler when some row needs it (it then replaces the sampled tokens)."""
        tokens, meta, rows, tensors = self._unpack(packed, prev, bucket)
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._param_tree, param_leaves))
        hidden, kv_cache = model(tokens, kv_cache, meta)  # (dp * T, E)
        logits = self._logits(model, hidden, rows, bucket)
        sampled = self._sample_rows(logits, tensors)
        return sampled, self._last_of(sampled.token_ids), logits, kv_cache

    def _fused_fn(self, param_leaves, kv_cache, packed, prev, bucket: Bucket, steps: int, sampler: str):
        """`steps` decode steps in one call: each row's sampled token is the next step's input.

        Only for plans of decodes (token i of shard d is row i), with pages already held
        for every position the steps reach. A row past its own step count computes on (its
        outputs are dropped) without advancing, writing to the trash page. Returns (steps,
        dp * B) token ids and logprobs, (steps, dp * B, K) top logprobs, `last` (each row's
        token of its last step), and the cache. `sampler` is the variant of engine.sampling.SAMPLERS
        every row allows (`sampler_for`): "full" ranks whole rows where it must, at the price of
        a branch in every step; "plain" returns no top logprobs.
        """
        tokens, meta, rows, tensors, row_steps = self._unpack(packed, prev, bucket, fused=True)
        model = nnx.merge(self.graphdef, jax.tree.unflatten(self._param_tree, param_leaves))
        t, b, ps = bucket.tokens, bucket.rows, self.page_size
        dp = packed.shape[0]

        def of_token(x):  # (dp * B, ...) values of rows -> (dp * T, ...) values of their tokens
            idx = meta.token_seq.reshape((dp, t) + (1,) * (x.ndim - 1))  # row within its shard: no collective
            return jnp.take_along_axis(x.reshape((dp, b) + x.shape[1:]), idx, axis=1).reshape((dp * t,) + x.shape[1:])

        real = of_token(meta.seq_lens) > 0  # padding tokens keep writing to the trash page
        token_steps, token_tables = of_token(row_steps), of_token(meta.block_tables)
        trash = jnp.arange(tokens.shape[0]) % ps  # slots of page 0

        def one(k, carry):
            kv_cache, tokens, out = carry
            active = real & (k < token_steps)
            pos = meta.positions + k
            page = jnp.take_along_axis(token_tables, (pos // ps)[:, None], axis=1, mode="clip")[:, 0]
            step_meta = meta.replace(
                positions=jnp.where(active, pos, meta.positions),
                slot_mapping=jnp.where(active, page * ps + pos % ps, jnp.where(real, trash, meta.slot_mapping)),
                seq_lens=jnp.where(meta.seq_lens > 0, meta.seq_lens + jnp.clip(row_steps - 1, 0, k), 0),
            )
            hidden, kv_cache = model(tokens, kv_cache, step_meta)
            sampled = self._sample_rows(self._logits(model, hidden, rows, bucket), tensors.replace(step=tensors.step + k),
                                        sampler=sampler)
            out = jax.tree.map(lambda acc, x: acc.at[k].set(x), out, sampled)
            return kv_cache, jnp.where(real, of_token(sampled.token_ids), 0), out

        logits_shape = jax.ShapeDtypeStruct((tensors.step.shape[0], model.config.vocab_size), jnp.float32)
        out = jax.tree.map(  # rows stay with their data shard until the call returns
            lambda x: jax.lax.with_sharding_constraint(jnp.zeros((steps,) + x.shape, x.dtype), self._steps_rows),
            jax.eval_shape(functools.partial(sample, rank=sampler != "plain"), logits_shape, tensors))
        kv_cache, _, out = jax.lax.fori_loop(0, steps, one, (kv_cache, tokens, out))
        final = jnp.clip(row_steps - 1, 0, steps - 1)[None]  # (1, dp * B): each row's last step
        return out, self._last_of(jnp.take_along_axis(out.token_ids, final, axis=0)[0]), kv_cache

    def _sample_rows(self, logits, tensors, *extras, sampler: str = "ranked"):
        """`sample` as the variant `sampler` (engine.sampling.SAMPLERS), each data shard on its own
        rows and, under tensor parallelism, each model shard on its own slice of the vocabulary
        (merged through (rows, k) collectives). Left to XLA, the row-wise sampler would pay a
        collective for each of its reductions, or gather the logits."""
        axis = self._logit_spec[1]
        variant = functools.partial(sample, vocab_axis=axis, full_rank=sampler == "full", rank=sampler != "plain")
        return jax.shard_map(variant, mesh=self.mesh,
                             in_specs=(self._logit_spec,) + (P(DATA),) * (1 + len(extras)), out_specs=P(DATA),
                             check_vma=False)(logits, tensors, *extras)

    def _full_sampler_fn(self, logits, sampling, history, num_prompt):
        """The sampler with penalties and full ranking, on a step's logits and the sampling field of
        its packed inputs; and the step's `last` from its tokens."""
        sampled = self._sample_rows(logits, SamplingTensors.unpack(sampling.reshape(-1, PACKED_WIDTH)), history,
                                    num_prompt, sampler="full")
        return sampled, self._last_of(sampled.token_ids)

    def _packed_len(self, bucket: Bucket, fused: bool = False) -> int:
        b = bucket.rows
        return 5 * bucket.tokens + b * bucket.pages + (4 if fused else 3) * b + 1 + b * PACKED_WIDTH

    def warmup(self, progress: bool = True) -> float:
        """Compile every bucket (and the full sampler for every row count). Returns seconds spent.

        Tracing and lowering run one graph at a time (Python); XLA compiles them side by side
        in COMPILE_THREADS threads (it releases the GIL). `warmup_report` says where the time went.
        """
        start = time.perf_counter()
        jobs = []  # (table, key, lowered, compiler options)
        decode_options = self._decode_compiler_options()
        # `prev` is donated so that `last` reuses its buffer: with a new address every call, XLA
        # re-recorded the step's command buffers before launching it (TTFT@1024 on an H100, 8B:
        # 34.7 ms, 28.9 ms donated).
        step = jax.jit(self._step_fn, static_argnums=(4,), donate_argnums=(1, 3),
                       in_shardings=(self._param_shardings, self._cache_shardings, self._rows, self._rows),
                       out_shardings=(self._replicated, self._rows, self._logit_rows, self._cache_shardings))
        for bucket in self.buckets():
            packed = jax.ShapeDtypeStruct((self.dp, self._packed_len(bucket)), jnp.int32)
            jobs.append((self._steps, bucket, step.lower(self._param_leaves, self.kv_cache, packed, self._last, bucket),
                         decode_options if bucket in self.decode_buckets() else None))
        sampler = jax.jit(self._full_sampler_fn, in_shardings=(self._logit_rows, self._rows, self._rows, self._rows),
                          out_shardings=(self._replicated, self._rows))
        for r in sorted({bk.rows for bk in self.buckets()}):  # the full samplers, by row count
            logits = jax.ShapeDtypeStruct((self.dp * r, self.vocab_size), jnp.float32)
            jobs.append((self._samplers, r, sampler.lower(logits, *_abstract(self._full_sampler_inputs(r))), None))
        fused_step = jax.jit(self._fused_fn, static_argnums=(4, 5, 6), donate_argnums=(1, 3),
                             in_shardings=(self._param_shardings, self._cache_shardings, self._rows, self._rows),
                             out_shardings=(self._replicated, self._rows, self._cache_shardings))
        for bucket in self.decode_buckets() if self.decode_steps > 1 else []:
            packed = jax.ShapeDtypeStruct((self.dp, self._packed_len(bucket, fused=True)), jnp.int32)
            for sampler in SAMPLERS:
                jobs.append((self._fused, (bucket, sampler), fused_step.lower(
                    self._param_leaves, self.kv_cache, packed, self._last, bucket, self.decode_steps, sampler),
                    decode_options))
        lowered_at = time.perf_counter()
        with tqdm(total=len(jobs), desc="compiling", disable=not progress, unit="graph") as bar:
            def compile_one(job):
                table, key, lowered, options = job
                table[key] = lowered.compile(options)
                bar.update()
            with ThreadPoolExecutor(max(1, min(COMPILE_THREADS, len(jobs)))) as pool:
                list(pool.map(compile_one, jobs))  # list(): re-raises the first failure
        if self._multihost:  # compile the broadcasts of every step's inputs too
            for bucket in self.buckets():
                for full in (False, True):
                    broadcast_one_to_all(self._header(_STEP, bucket, full))
                    broadcast_one_to_all(self._payload(bucket, full))
        end = time.perf_counter()
        self.warmup_report = {"graphs": len(jobs), "step_graphs": len(self._steps) + len(self._fused),
                              "trace_and_lower_s": lowered_at - start, "compile_s": end - lowered_at,
                              "compile_threads": min(COMPILE_THREADS, len(jobs)),
                              "scratch_bytes": self.scratch_bytes()}
        return end - start

    def scratch_bytes(self) -> int:
        """The most device memory (per device) any compiled graph allocates while it runs, beyond
        its inputs: temporaries plus the outputs that do not reuse a donated input's buffer."""
        most = 0
        for compiled in (*self._steps.values(), *self._samplers.values(), *self._fused.values()):
            m = compiled.memory_analysis()
            if m is not None:
                most = max(most, m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
        return most

    def _decode_compiler_options(self) -> dict | None:
        """XLA options of the graphs that decode plans use (see DECODE_COMMAND_BUFFERS)."""
        if self.mesh.shape[MODEL] > 1 and self.mesh.devices.flat[0].platform == "gpu":
            return {"xla_gpu_enable_command_buffer": DECODE_COMMAND_BUFFERS}
        return None

    def _full_sampler_inputs(self, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Neutral inputs of the full sampler but the logits, `rows` a shard: (sampling, history, num_prompt)."""
        r = self.dp * rows
        return (np.zeros((self.dp, rows * PACKED_WIDTH), np.int32), np.zeros((r, self.max_model_len), np.int32),
                np.zeros(r, np.int32))

    # ---- one step ------------------------------------------------------------------

    def _bucket_for(self, plans: tuple[StepPlan, ...]) -> Bucket:
        n_tok = max(plan.num_tokens for plan in plans)
        n_pages = max(len(s.page_ids) for plan in plans for s in plan.seqs)
        t = next((b for b in self.token_buckets if b >= n_tok), None)
        p = next((b for b in self.page_buckets if b >= n_pages), None)
        if t is None or p is None:
            raise RuntimeError(f"step of {n_tok} tokens / {n_pages} pages exceeds every bucket")
        return Bucket(t, min(t, self.max_num_seqs) + 1, p)

    def _pack(self, plan: StepPlan, bucket: Bucket, prev_rows: dict[str, int],
              row_steps: np.ndarray | None = None) -> np.ndarray:
        """The packed host inputs of one shard's plan (and a fused call's steps field). A PENDING
        token reads the previous call's `last` at its sequence's row there, `prev_rows[seq_id]`.

        Built with whole-array numpy operations: a Python loop over the rows cost ~2 ms a step
        at 256 decodes, host time the device waits for."""
        t, b, p, ps = bucket.tokens, bucket.rows, bucket.pages, self.page_size
        seqs = plan.seqs
        k = len(seqs)
        n = np.fromiter((len(s.token_ids) for s in seqs), np.int32, k)  # tokens per row
        start = np.fromiter((s.start_pos for s in seqs), np.int32, k)
        num_pages = np.fromiter((len(s.page_ids) for s in seqs), np.int32, k)
        at = int(n.sum())
        qsl = np.full(b + 1, at, np.int32)  # rows past the plan's are empty
        qsl[0] = 0
        np.cumsum(n, out=qsl[1:k + 1])

        tokens = np.zeros(t, np.int32)
        positions = np.zeros(t, np.int32)
        slots = np.arange(t, dtype=np.int32) % ps  # padding writes into page 0, the trash page
        token_seq = np.full(t, b - 1, np.int32)  # padding tokens belong to the spare last row
        src = np.full(t, -1, np.int32)
        tables = np.zeros((b, p), np.int32)
        seq_lens = np.zeros(b, np.int32)
        rows = np.zeros(b, np.int32)
        if k:
            tokens[:at] = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in seqs), np.int32, at)
            token_seq[:at] = np.repeat(np.arange(k, dtype=np.int32), n)
            positions[:at] = np.arange(at, dtype=np.int32) - np.repeat(qsl[:k] - start, n)
            held = int(num_pages.sum())
            page_row = np.repeat(np.arange(k), num_pages)
            page_col = np.arange(held) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)
            tables[page_row, page_col] = np.fromiter(
                itertools.chain.from_iterable(s.page_ids for s in seqs), np.int32, held)
            pos = positions[:at]
            slots[:at] = tables[token_seq[:at], pos // ps] * ps + pos % ps
            seq_lens[:k] = start + n
            rows[:k] = qsl[1:k + 1] - 1
            pending = np.flatnonzero(tokens[:at] == PENDING)
            if len(pending):
                src[pending] = [prev_rows[seqs[i].seq_id] for i in token_seq[pending].tolist()]
        fused = () if row_steps is None else (row_steps,)
        return np.concatenate([tokens, positions, slots, token_seq, src, tables.ravel(), seq_lens, qsl, rows, *fused])

    def dispatch(self, plans: tuple[StepPlan, ...], seqs: dict[str, Sequence],
                 suppress: dict[str, list[int]]) -> Call:
        """Queue one step, plans[d] on data shard d (at least one sequence); returns without
        waiting. `collect` reads the token sampled for every chunk that asked for one."""
        bucket = self._bucket_for(plans)
        # (sampler row, chunk): shard d's rows are d * B .. d * B + B - 1
        scheduled = [(d * bucket.rows + i, s) for d, plan in enumerate(plans) for i, s in enumerate(plan.seqs)]
        n = self.dp * bucket.rows
        row_params: list[RowParams | None] = [None] * n
        full = False  # some row needs the full sampler
        for r, s in scheduled:
            if s.sample:
                seq = seqs[s.seq_id]
                row_params[r] = RowParams(seq.params, seq.seed, seq.num_output_tokens, suppress.get(s.seq_id, []))
                full |= seq.params.uses_penalties or needs_full_rank(seq.params, self.vocab_size)
        packed = self._with_sampling([self._pack(plan, bucket, self._last_rows) for plan in plans], row_params)
        extras = ()
        if full:
            history = np.full((n, self.max_model_len), -1, np.int32)
            num_prompt = np.zeros(n, np.int32)
            for r, s in scheduled:
                seq = seqs[s.seq_id]
                if s.sample and seq.params.uses_penalties:
                    if seq.num_pending:
                        raise RuntimeError(f"{s.seq_id} uses penalties: its last token must be read before this step")
                    ids = seq.all_token_ids
                    history[r, :len(ids)] = ids
                    num_prompt[r] = seq.num_prompt_tokens
            extras = (np.ascontiguousarray(packed[:, -bucket.rows * PACKED_WIDTH:]), history, num_prompt)
        self._last_rows = _rows_by_seq(plans)
        if self._multihost:
            broadcast_one_to_all(self._header(_STEP, bucket, full))
            packed, extras = broadcast_one_to_all((packed, extras))
        else:  # the transfers start here: the launcher thread only queues the call (see _launch)
            packed, extras = self._put((packed, extras))
        want_top = _want_top(scheduled, seqs)
        out = self._launch(lambda: self._execute(bucket, packed, extras), want_top)
        return Call(bucket, scheduled, out, want_top, fused=False)

    def _with_sampling(self, packs: list[np.ndarray], row_params: list[RowParams | None]) -> np.ndarray:
        """(dp, L): each shard's packed plan followed by its rows' packed sampling parameters."""
        sampling = SamplingTensors.pack(row_params, len(row_params)).reshape(self.dp, -1)
        return np.concatenate([np.stack(packs), sampling], axis=1)

    @staticmethod
    def _results(scheduled, out, want_top: bool) -> dict[str, Sampled]:
        """One step's sampler output (host arrays) for every chunk that sampled (with the top
        logprobs when some sequence asked for logprobs)."""
        token_ids, logprobs, top_ids, top_lps = out
        token_ids, logprobs = token_ids.tolist(), logprobs.tolist()  # Python numbers in one pass each
        if not want_top:
            return {s.seq_id: Sampled(token_ids[r], logprobs[r], None, None) for r, s in scheduled if s.sample}
        return {s.seq_id: Sampled(token_ids[r], logprobs[r], top_ids[r], top_lps[r]) for r, s in scheduled if s.sample}

    def dispatch_fused(self, plans: tuple[StepPlan, ...], seqs: dict[str, Sequence], steps: dict[str, int]) -> Call:
        """Queue `decode_steps` decode steps in one call, for plans of decodes; sequence s decodes in
        the first steps[s] of them (up to its length) and holds pages for every position it
        reaches (Scheduler.reserve_ahead). Returns without waiting."""
        bucket = self._bucket_for(plans)
        packs = []
        for plan in plans:
            row_steps = np.zeros(bucket.rows, np.int32)
            row_steps[:len(plan.seqs)] = [steps[s.seq_id] for s in plan.seqs]
            packs.append(self._pack(plan, bucket, self._last_rows, row_steps))
        scheduled = [(d * bucket.rows + i, s) for d, plan in enumerate(plans) for i, s in enumerate(plan.seqs)]
        row_params: list[RowParams | None] = [None] * (self.dp * bucket.rows)
        variant = 0  # the cheapest of SAMPLERS that every row allows
        for r, s in scheduled:
            seq = seqs[s.seq_id]
            row_params[r] = row = RowParams(seq.params, seq.seed, seq.num_output_tokens)
            variant = max(variant, SAMPLERS.index(sampler_for(row, self.vocab_size)))
        packed = self._put(self._with_sampling(packs, row_params))
        self._last_rows = _rows_by_seq(plans)
        fused = self._fused[bucket, SAMPLERS[variant]]

        def queue():
            out, self._last, self.kv_cache = fused(self._param_leaves, self.kv_cache, packed, self._last)
            return out

        want_top = _want_top(scheduled, seqs)
        return Call(bucket, scheduled, self._launch(queue, want_top), want_top, fused=True)

    def collect(self, call: Call) -> list[dict[str, Sampled]]:
        """Wait for a call; one result dict per step it made (one for a plain step)."""
        o = call.out.result()  # one read of what is needed; slicing numpy compiles nothing
        out = [np.asarray(x) for x in _wanted(o, call.want_top)] + [None, None] * (not call.want_top)
        if not call.fused:
            return [self._results(call.scheduled, out, call.want_top)]
        return [self._results(call.scheduled, [None if x is None else x[k] for x in out], call.want_top)
                for k in range(self.decode_steps)]

    def _launch(self, queue, want_top: bool) -> Future:
        """Run `queue` (which queues compiled calls and returns their SampleOutput) on the launcher
        thread, or here with several processes; what `collect` reads starts its way to the host
        as soon as it is queued."""
        def run():
            out = queue()
            for x in _wanted(out, want_top):
                x.copy_to_host_async()
            return out

        if self._launcher is not None:
            return self._launcher.submit(run)
        done = Future()
        done.set_result(run())
        return done

    def _execute(self, bucket: Bucket, packed, extras: tuple):
        """The compiled step (sampling inside), and the full sampler when `extras` carry the packed
        sampling field and the penalty history; every process runs this with the same inputs."""
        sampled, self._last, logits, self.kv_cache = self._steps[bucket](self._param_leaves, self.kv_cache,
                                                                          self._put(packed), self._last)
        if extras:
            sampled, self._last = self._samplers[bucket.rows](logits, *self._put(extras))
        return sampled

    def _put(self, tree):
        """Host arrays onto the row shards (device arrays stay as they are). With several processes,
        each process places its own shards of the identical broadcast values."""
        if not self._multihost:
            return jax.tree.map(lambda x: x if isinstance(x, jax.Array) else jax.device_put(x, self._rows), tree)
        return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, self._rows, lambda i: x[i]), tree)

    # ---- several processes ---------------------------------------------------------

    def _header(self, command: int, bucket: Bucket, full: bool) -> np.ndarray:
        return np.asarray([command, self.buckets().index(bucket), full], np.int32)

    def _payload(self, bucket: Bucket, full: bool) -> tuple:
        """Zero host inputs of one step, shaped like what the lead broadcasts: (packed, extras)."""
        extras = self._full_sampler_inputs(bucket.rows) if full else ()
        return np.zeros((self.dp, self._packed_len(bucket)), np.int32), extras

    def follow(self) -> None:
        """The loop of every process but the lead: run the steps the lead broadcasts until it stops."""
        buckets = self.buckets()
        while True:
            command, index, full = broadcast_one_to_all(self._header(_STOP, buckets[0], False))
            if command == _STOP:
                return
            bucket = buckets[index]
            packed, extras = broadcast_one_to_all(self._payload(bucket, bool(full)))
            self._execute(bucket, packed, extras)

    def stop_followers(self) -> None:
        """Release the followers from `follow` (the lead calls this once, when it shuts down)."""
        if self._multihost and jax.process_index() == 0 and not self._followers_stopped:
            self._followers_stopped = True
            broadcast_one_to_all(self._header(_STOP, self.buckets()[0], False))


def _abstract(tree):
    """Shapes and dtypes of host arrays, to lower a step without data."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _rows_by_seq(plans: tuple[StepPlan, ...]) -> dict[str, int]:
    """Each sampling sequence's row within its shard: where its token is in the call's `last`."""
    return {s.seq_id: i for plan in plans for i, s in enumerate(plan.seqs) if s.sample}


def _want_top(scheduled, seqs: dict[str, Sequence]) -> bool:
    return any(s.sample and seqs[s.seq_id].params.logprobs for _, s in scheduled)


def _wanted(out, want_top: bool) -> list[jax.Array]:
    """The arrays of a SampleOutput that `collect` reads (replicated: each process reads its own copy)."""
    return [out.token_ids, out.logprobs] + ([out.top_ids, out.top_logprobs] if want_top else [])
