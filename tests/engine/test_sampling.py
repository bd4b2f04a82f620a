"""On-device sampling against numpy references written here, and its guarantees:
greedy equivalences, seeded reproducibility across batches, and the sampled
distribution (chi-square) at temperature 1 and under temperature + top-k + top-p.

Few distinct shapes, so few compilations: (8, 300) and (3, 300) without history,
(4, 64) with history, (N_DRAWS, 8) for the distribution tests, and (4, 2000), a vocabulary
wider than the ranked candidates, with and without history.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import chi2

from engine.params import ParamError, SamplingParams
from engine.sampling import (
    MAX_LOGIT_BIAS,
    MAX_SUPPRESS,
    TOP_CANDIDATES,
    RowParams,
    SamplingTensors,
    _top_k_top_p_threshold,
    best_processed,
    filter_mask,
    needs_full_rank,
    process_logits,
    sample,
    sampler_for,
    top_k_exact,
)

sample_jit = jax.jit(sample, static_argnames=("num_top_logprobs", "full_rank", "rank"))
filter_jit = jax.jit(filter_mask, static_argnames=("candidates", "full_rank"))
V_BIG = 300  # > TOP_CANDIDATES, so top-k/top-p first try the candidates
N_DRAWS = 20_000
P_MIN = 1e-3  # chi-square significance; seeds are fixed, so a pass stays a pass
SMALL_VOCAB = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -3.0], np.float32)
assert TOP_CANDIDATES < V_BIG


def row(seed=0, step=0, suppress=(), **kw) -> RowParams:
    return RowParams(SamplingParams(**kw), seed=seed, step=step, suppress_ids=suppress)


def random_logits(b, v, seed=0, scale=2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal((b, v))).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def ref_mask(z: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """vLLM's recipe for one row: sort, cut top-k, cut top-p on the renormalised rest, min-p."""
    z = z.astype(np.float64)
    order = np.argsort(-z, kind="stable")
    kept = order[: top_k if 0 < top_k < len(z) else len(z)]
    p = softmax(z[kept])
    if top_p < 1:
        kept = kept[np.cumsum(p) - p < top_p]  # mass of better tokens below top_p
    keep = np.zeros(len(z), bool)
    keep[kept] = True
    probs = softmax(z)
    return keep & (probs > 0) & (probs >= min_p * probs.max())


def ref_process(logits: np.ndarray, rows: list[RowParams], history: np.ndarray, num_prompt: np.ndarray):
    """Bias, suppress, then vLLM's penalties, one row at a time in float64."""
    out = logits.astype(np.float64).copy()
    for b, r in enumerate(rows):
        z, sp = out[b], r.params
        for tok, val in (sp.logit_bias or {}).items():
            z[tok] += val
        z[list(r.suppress_ids)] = -np.inf
        prompt = history[b, : num_prompt[b]].tolist()
        output = [x for x in history[b, num_prompt[b] :].tolist() if x >= 0]
        for tok in set(prompt) | set(output):
            z[tok] = z[tok] / sp.repetition_penalty if z[tok] > 0 else z[tok] * sp.repetition_penalty
        for tok, count in collections.Counter(output).items():
            z[tok] -= sp.frequency_penalty * count + sp.presence_penalty
    return out


def chi_square_p(tokens: np.ndarray, expected_probs: np.ndarray) -> float:
    """p-value of the observed token counts under `expected_probs` (support only)."""
    support = expected_probs > 0
    assert np.all(support[tokens]), "a token outside the expected support was drawn"
    observed = np.bincount(tokens, minlength=len(expected_probs))[support]
    expected = len(tokens) * expected_probs[support]
    stat = float(((observed - expected) ** 2 / expected).sum())
    return float(chi2.sf(stat, df=int(support.sum()) - 1))


def draw(rows: list[RowParams]) -> np.ndarray:
    """One token per row, every row on SMALL_VOCAB."""
    assert len(rows) == N_DRAWS
    logits = np.tile(SMALL_VOCAB, (N_DRAWS, 1))
    return np.asarray(sample_jit(logits, SamplingTensors.build(rows, N_DRAWS)).token_ids)


def test_top_k_1_and_temperature_0_are_greedy():
    logits = random_logits(8, V_BIG)
    rows = [row(seed=i, step=3 * i, temperature=0.5 + i, top_k=1) for i in range(4)]
    rows += [row(temperature=0.0, top_p=0.5, min_p=0.2), row(temperature=0.0, top_k=5), None]
    rows += [row(seed=9, temperature=1.0)]  # one random row, so the non-greedy branch runs
    out = sample_jit(logits, SamplingTensors.build(rows, 8))
    np.testing.assert_array_equal(np.asarray(out.token_ids)[:7], logits[:7].argmax(-1))


def test_bias_and_suppress_without_history():
    logits = random_logits(8, V_BIG, seed=4)
    second = np.argsort(-logits, axis=-1)[:, 1]
    best = int(logits[1].argmax())
    rows = [row(temperature=0.0, logit_bias={11: 100.0}), row(temperature=0.0, suppress=(best,))]
    out = sample_jit(logits, SamplingTensors.build(rows, 8))
    assert out.token_ids.tolist()[:2] == [11, int(second[1])]


def test_top_k_exact_matches_lax_top_k_with_ties():
    x = np.random.default_rng(1).integers(-4, 4, (5, 1001)).astype(np.float32)  # many ties
    x[0] = -np.inf
    x[0, 500] = 0.0  # one finite token
    x[1, ::2] = -np.inf
    for k in (1, 20, 40):
        got, want = top_k_exact(jnp.asarray(x), k, chunk=16), jax.lax.top_k(jnp.asarray(x), k)
        np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
        np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


def test_filter_mask_matches_reference():
    v, settings = 50, []
    for top_k in (0, 1, 3, 17, 49, 50, 80):
        for top_p in (1.0, 0.95, 0.6, 0.05):
            for min_p in (0.0, 0.05, 0.3):
                settings.append((top_k, top_p, min_p))
    z = random_logits(len(settings), v, seed=1)
    z[0, 7] = -np.inf  # a suppressed token stays out
    k, p, m = (np.array(c) for c in zip(*settings))
    args = jnp.asarray(z), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32), jnp.asarray(m, jnp.float32)
    ref = np.stack([ref_mask(z[i], *s) for i, s in enumerate(settings)])
    for candidates in (6, 20, v):  # mostly sorted in full / mostly not / the whole row
        np.testing.assert_array_equal(np.asarray(filter_jit(*args, candidates=candidates)), ref)
    assert not ref[0, 7] and ref[0].sum() == v - 1  # row 0 has no filter: all but the -inf token

    # rows whose cut lies within the candidates get it without the sort, and are told so
    c = 20
    threshold, decided = jax.jit(_top_k_top_p_threshold, static_argnums=3)(*args[:3], c)
    threshold, decided = np.asarray(threshold), np.asarray(decided)
    nucleus = np.array([ref_mask(z[i], 0, s[1], 0.0).sum() for i, s in enumerate(settings)])
    k_on = (k > 0) & (k < v)
    np.testing.assert_array_equal(decided, np.where(k_on, k <= c, (p >= 1) | (nucleus <= c)))
    cut = np.stack([ref_mask(z[i], s[0], s[1], 0.0) for i, s in enumerate(settings)])
    np.testing.assert_array_equal((z >= threshold[:, None])[decided] & (z > -np.inf)[decided], cut[decided])


def test_without_full_rank_rows_that_do_not_need_it_get_the_same_cut_and_token():
    """The sampler without `full_rank` ranks only each row's candidates; every row that
    needs_full_rank clears gets the reference mask, and the same token as the full sampler."""
    v, c, settings = 50, 6, []
    for top_k in (0, 1, 3, 6, 7, 49, 50, 80):
        for top_p in (1.0, 0.95, 0.6, 0.05):
            settings.append((top_k, top_p))
    z = random_logits(len(settings), v, seed=5)
    k, p = (np.array(x) for x in zip(*settings))
    args = jnp.asarray(z), jnp.asarray(k, jnp.int32), jnp.asarray(p, jnp.float32), jnp.zeros(len(settings))
    fits = np.array([not needs_full_rank(SamplingParams(temperature=1.0, top_k=a, top_p=b), v, c) for a, b in settings])
    assert 0 < fits.sum() < len(settings)
    assert fits.tolist() == [(0 < a <= c) or (top_p >= 1 and not c < a < v) for a, top_p in settings]
    ref = np.stack([ref_mask(z[i], a, b, 0.0) for i, (a, b) in enumerate(settings)])
    got = np.asarray(filter_jit(*args, candidates=c, full_rank=False))
    np.testing.assert_array_equal(got[fits], ref[fits])

    logits = random_logits(8, V_BIG, seed=6)
    rows = [row(seed=1, temperature=1.0), row(seed=2, temperature=0.7, top_k=40, top_p=0.8),
            row(seed=3, temperature=1.3, top_k=TOP_CANDIDATES, min_p=0.01), row(temperature=0.0, top_p=0.5),
            row(seed=4, temperature=1.0, top_k=1), None, row(seed=5, temperature=2.0, logit_bias={3: 1.0}),
            row(seed=6, temperature=0.9, top_p=0.99)]
    tensors = SamplingTensors.build(rows, 8)
    fast, full = (sample_jit(logits, tensors, full_rank=f) for f in (False, True))
    ok = [r is not None and not needs_full_rank(r.params, V_BIG) for r in rows]
    assert ok == [True] * 5 + [False, True, False]
    np.testing.assert_array_equal(np.asarray(fast.token_ids)[ok], np.asarray(full.token_ids)[ok])
    np.testing.assert_array_equal(np.asarray(fast.logprobs)[ok], np.asarray(full.logprobs)[ok])


def test_only_the_full_sampler_branches():
    """On a GPU, XLA runs a lax.cond (or a loop of unknown length) by reading its predicate back to
    the host, which blocks the thread that queues the calls until the device gets there: the
    step's sampler has neither (threefry's loop of rounds has a known trip count)."""
    logits = jnp.zeros((8, V_BIG))
    tensors = SamplingTensors.build([row(temperature=1.0, top_p=0.9)], 8)
    hlo = {f: sample_jit.lower(logits, tensors, full_rank=f).compile().as_text() for f in (False, True)}
    assert " conditional(" not in hlo[False]
    assert all("known_trip_count" in line for line in hlo[False].splitlines() if " while(" in line)
    assert " conditional(" in hlo[True]


def test_plain_sampler_draws_the_rows_it_allows_like_the_ranked_one():
    """Rows without logprobs, bias, suppressed ids or a top-k/top-p cut may take the "plain"
    sampler, which ranks nothing: each gets the ranked sampler's token and logprob."""
    rows = [row(seed=1, temperature=1.0), row(temperature=0.0, top_p=0.5), row(seed=2, temperature=0.7, min_p=0.05),
            row(seed=3, temperature=1.0, top_k=1), row(seed=4, temperature=1.3, logprobs=0), None,
            row(seed=5, temperature=1.0, top_k=V_BIG), row(seed=6, temperature=2.0, top_k=0, top_p=1.0)]
    assert [r and sampler_for(r, V_BIG) for r in rows] == ["plain"] * 5 + [None] + ["plain"] * 2
    not_plain = {"ranked": [row(temperature=1.0, top_k=40), row(temperature=1.0, top_k=40, top_p=0.5),
                            row(temperature=0.0, logprobs=1), row(temperature=1.0, logit_bias={3: 1.0}),
                            row(temperature=1.0, suppress=(2,))],
                 "full": [row(temperature=1.0, top_p=0.9), row(temperature=1.0, top_k=V_BIG - 1)]}
    for want, examples in not_plain.items():
        assert [sampler_for(r, V_BIG) for r in examples] == [want] * len(examples)
    logits = random_logits(8, V_BIG, seed=11)
    tensors = SamplingTensors.build(rows, 8)
    for step in range(3):  # the noise changes with the step
        t = tensors.replace(step=tensors.step + step)
        plain, ranked = (sample_jit(logits, t, full_rank=False, rank=r) for r in (False, True))
        live = [r is not None for r in rows]
        np.testing.assert_array_equal(np.asarray(plain.token_ids)[live], np.asarray(ranked.token_ids)[live])
        np.testing.assert_array_equal(np.asarray(plain.logprobs)[live], np.asarray(ranked.logprobs)[live])
    assert plain.top_ids.shape == plain.top_logprobs.shape == (8, 0)
    hlo = sample_jit.lower(logits, tensors, full_rank=False, rank=False).compile().as_text()
    assert " sort(" not in hlo and " conditional(" not in hlo


def test_penalties_bias_and_suppress_match_reference():
    v, h = 64, 12
    logits = random_logits(4, v, seed=3)
    rows = [
        row(repetition_penalty=1.3, logit_bias={4: 2.5, 9: -1.0}, suppress=(0, 29)),
        row(presence_penalty=0.7, frequency_penalty=0.4),
        row(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.5, suppress=(5,)),
        row(),
    ]
    history = np.full((4, h), -1, np.int32)
    num_prompt = np.array([4, 3, 5, 2], np.int32)
    history[0, :7] = [1, 2, 2, 3, 3, 3, 4]  # prompt 1 2 2 3 | output 3 3 4
    history[1, :9] = [5, 6, 7, 6, 6, 8, 7, 1, 1]  # prompt 5 6 7 | output 6 6 8 7 1 1
    history[2, :12] = [10, 11, 12, 13, 14, 10, 10, 15, 5, 14, 20, 21]
    history[3, :2] = [1, 2]  # prompt only
    t = SamplingTensors.build(rows, 4)
    got = jax.jit(process_logits)(jnp.asarray(logits), t, jnp.asarray(history), jnp.asarray(num_prompt))
    ref = ref_process(logits, rows, history, num_prompt)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6, atol=1e-6)

    greedy_rows = [RowParams(r.params.replace(temperature=0.0), 0, 0, r.suppress_ids) for r in rows]
    out = sample_jit(logits, SamplingTensors.build(greedy_rows, 4), history, num_prompt)
    np.testing.assert_array_equal(np.asarray(out.token_ids), ref.argmax(-1))


V_WIDE = 2000  # > TOP_CANDIDATES + MAX_LOGIT_BIAS + MAX_SUPPRESS: the raw ranking leaves ids out
assert TOP_CANDIDATES + MAX_LOGIT_BIAS + MAX_SUPPRESS < V_WIDE


def adversarial_rows(logits: np.ndarray) -> list[RowParams]:
    """Rows whose bias and suppress_ids reorder the top of the raw ranking as much as they can:
    the 16 best suppressed and the next 64 lowered, so the 256th best after them is the raw 336th;
    ids from the bottom raised into the top; repeated, padded and out-of-vocabulary ids."""
    order = np.argsort(-logits, axis=-1, kind="stable")
    rows = []
    for b in range(logits.shape[0]):
        top = order[b].tolist()
        if b == 0:
            bias = {top[16 + i]: -50.0 for i in range(MAX_LOGIT_BIAS)}
            rows.append(row(seed=b, temperature=0.8, top_k=TOP_CANDIDATES, logit_bias=bias, suppress=tuple(top[:16])))
        elif b == 1:
            bias = {top[-1 - i]: 30.0 + i for i in range(40)} | {top[i]: -3.0 for i in range(24)}
            rows.append(row(seed=b, temperature=1.2, top_k=50, top_p=0.9, logit_bias=bias, suppress=tuple(top[24:40])))
        elif b == 2:
            rows.append(row(seed=b, temperature=1.0, top_p=0.5, logit_bias={top[300]: 0.0, top[-5]: 1e-3}))
        else:
            rows.append(row(seed=b, temperature=0.7, top_k=200, min_p=0.01))
    return rows


def test_candidates_from_the_raw_ranking_are_the_best_after_bias():
    logits = np.round(random_logits(4, V_WIDE, seed=11), 1)  # many ties
    logits[3] -= 10  # below 0: a dropped id read as 0 would make the cut
    rows = adversarial_rows(logits)
    t = SamplingTensors.build(rows, 4)
    bias_ids, bias_values = np.asarray(t.bias_ids).copy(), np.asarray(t.bias_values).copy()
    # a repeated id raised into the top (both entries add up), padding, an id outside the vocabulary
    bias_ids[3, :4], bias_values[3, :4] = [7, 7, -1, V_WIDE + 5], [20.0, 20.0, 0.0, 1.0]
    t = t.replace(bias_ids=jnp.asarray(bias_ids), bias_values=jnp.asarray(bias_values))
    z = jax.jit(process_logits)(jnp.asarray(logits), t)
    _, ranked = top_k_exact(jnp.asarray(logits), TOP_CANDIDATES + MAX_LOGIT_BIAS + MAX_SUPPRESS)
    got = jax.jit(best_processed, static_argnums=3)(z, ranked, t.bias_ids, TOP_CANDIDATES)
    want = -np.sort(-np.asarray(z), axis=-1)[:, :TOP_CANDIDATES]
    np.testing.assert_array_equal(np.asarray(got), want)
    assert want[0, -1] == -np.sort(-logits[0])[TOP_CANDIDATES + 80 - 1]  # row 0's cut is the raw 336th


def test_one_raw_ranking_samples_as_ranking_after_bias():
    """Without history the sampler ranks the raw logits once (top logprobs and candidates); with a
    neutral history it ranks the processed logits apart. Both must draw the same tokens."""
    logits = random_logits(4, V_WIDE, seed=12)
    t = SamplingTensors.build(adversarial_rows(logits), 4)
    history, num_prompt = np.full((4, 1), -1, np.int32), np.zeros(4, np.int32)
    for step in range(3):
        t = t.replace(step=jnp.full(4, step, jnp.int32))
        one = sample_jit(logits, t)
        apart = sample_jit(logits, t, history, num_prompt)
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(apart)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    top = np.argsort(-logits, axis=-1, kind="stable")[:, :20]
    np.testing.assert_array_equal(np.asarray(one.top_ids), top)


def test_logprobs_are_raw_log_softmax():
    v, h = 64, 12
    logits = random_logits(4, v, seed=6)
    rows = [
        row(seed=1, temperature=0.3, top_k=5, logit_bias={3: 4.0}),
        row(temperature=0.0, repetition_penalty=2.0, suppress=(int(logits[1].argmax()),)),
        row(seed=2, temperature=1.7, top_p=0.5, presence_penalty=1.0),
        None,
    ]
    history = np.full((4, h), -1, np.int32)
    history[:3, :3] = [[1, 2, -1], [3, 4, 5], [6, 6, 6]]
    out = sample_jit(logits, SamplingTensors.build(rows, 4), history, np.array([1, 2, 1, 0], np.int32))
    ref = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
    tokens = np.asarray(out.token_ids)
    np.testing.assert_allclose(np.asarray(out.logprobs), ref[np.arange(4), tokens], rtol=1e-5, atol=1e-6)
    top = np.argsort(-ref, axis=-1, kind="stable")[:, :20]
    np.testing.assert_array_equal(np.asarray(out.top_ids), top)
    want = np.take_along_axis(ref, top, -1)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), want, rtol=1e-5, atol=1e-6)


def test_seeded_row_is_the_same_in_any_batch():
    mine = random_logits(1, V_BIG, seed=7, scale=1.0)[0]
    others = random_logits(8, V_BIG, seed=8)
    for params in (dict(temperature=1.0), dict(temperature=0.8, top_k=40, top_p=0.9, min_p=0.01)):
        seen = []
        for step in range(8):
            r = row(seed=1234, step=step, **params)
            # batch A: first of 3, beside a top-p row (cut among the candidates)
            logits_a = np.stack([mine, others[0], others[1]])
            rows_a = [r, row(seed=5, step=step, top_p=0.5), row(temperature=0.0)]
            # batch B: sixth of 8, beside padding, greedy rows and a wide top-k (full sort)
            logits_b = others.copy()
            logits_b[5] = mine
            rows_b = [None, row(temperature=0.0), None, row(top_k=TOP_CANDIDATES + 10), None, r]
            a = sample_jit(logits_a, SamplingTensors.build(rows_a, 3)).token_ids[0]
            b = sample_jit(logits_b, SamplingTensors.build(rows_b, 8)).token_ids[5]
            assert int(a) == int(b)
            seen.append(int(a))
        assert len(set(seen)) > 1  # the step moves the stream


def test_temperature_1_matches_softmax():
    tokens = draw([row(seed=i, step=i % 7, temperature=1.0) for i in range(N_DRAWS)])
    assert chi_square_p(tokens, softmax(SMALL_VOCAB.astype(np.float64))) > P_MIN


def test_temperature_top_k_top_p_and_suppress_compose():
    temp, top_k, top_p, banned = 1.5, 5, 0.9, 0  # token 0 is the second most likely
    params = dict(temperature=temp, top_k=top_k, top_p=top_p)
    tokens = draw([row(seed=i, step=3, suppress=(banned,), **params) for i in range(N_DRAWS)])
    z = SMALL_VOCAB.astype(np.float64) / temp
    z[banned] = -np.inf
    keep = ref_mask(z, top_k, top_p, 0.0)
    # top-p on the top-k renormalised mass keeps fewer than either filter alone
    assert 1 < keep.sum() < min(top_k, ref_mask(z, 0, top_p, 0.0).sum())
    expected = np.where(keep, softmax(np.where(keep, z, -np.inf)), 0.0)
    assert chi_square_p(tokens, expected) > P_MIN  # also fails if `banned` is ever drawn


def test_build_pads_and_refuses_what_does_not_fit():
    t = SamplingTensors.build([row(top_k=-1, logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS)}), None], 3)
    assert t.top_k.tolist() == [0, 0, 0] and t.temperature.tolist() == [1.0, 0.0, 0.0]
    assert t.bias_ids.shape == (3, MAX_LOGIT_BIAS) and t.suppress_ids.tolist()[1] == [-1] * MAX_SUPPRESS
    with pytest.raises(ParamError, match="logit_bias") as err:
        SamplingTensors.build([row(logit_bias={i: 1.0 for i in range(MAX_LOGIT_BIAS + 1)})], 1)
    assert err.value.param == "logit_bias" and isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match="suppressed"):
        SamplingTensors.build([row(suppress=range(MAX_SUPPRESS + 1))], 1)
    with pytest.raises(ValueError, match="vocabulary"):
        SamplingTensors.build([row(logit_bias={100: 1.0})], 1, vocab_size=100)
    with pytest.raises(ValueError, match="do not fit"):
        SamplingTensors.build([None, None], 1)


@pytest.mark.parametrize("shards, v", [(4, 320), (2, 1408)])
def test_vocabulary_shards_sample_like_one_device(shards, v):
    """Logits split over the vocabulary (tensor parallelism) give the same tokens, top ids and
    logprobs as the whole rows, for every sampler feature: merges of the per-shard max, sum,
    top-k and Gumbel argmax; a cut among the candidates and the full-sort fallback; bias,
    suppress and penalty ids that land on other shards. v = 1408 gives each shard more than
    20 chunks, so the chunked top-k runs per shard too."""
    from jax.sharding import Mesh, PartitionSpec as P

    b, h = 12, 10
    rng = np.random.default_rng(11)
    logits = random_logits(b, v, seed=12)
    logits[3, :] = 0.05 * logits[3, :]  # a flat row: its nucleus is wider than the candidates
    logits[4, [7, v - 3]] = 9.0  # a tie across shards: the lower id wins
    far = v - 5  # an id on the last shard
    rows = [
        row(temperature=0.0),
        row(seed=1, step=4, temperature=1.0),
        row(seed=2, step=1, temperature=0.7, top_k=5, logit_bias={far: 3.0, 2: -1.0}),
        row(seed=3, step=9, temperature=1.0, top_p=0.97),
        row(temperature=0.0),
        row(seed=5, step=2, temperature=1.2, top_k=TOP_CANDIDATES + 20),
        row(seed=6, step=0, temperature=0.9, min_p=0.05, suppress=(int(logits[6].argmax()), far)),
        row(seed=7, step=5, temperature=1.0, top_p=0.6, repetition_penalty=1.4, presence_penalty=0.5),
        row(seed=8, step=3, temperature=0.5, frequency_penalty=0.8),
        None,
        row(seed=10, step=1, top_k=40, top_p=0.8, min_p=0.01),
        row(temperature=0.0, logit_bias={far: 50.0}),
    ]
    history = np.full((b, h), -1, np.int32)
    history[:, :6] = rng.integers(0, v, (b, 6))
    num_prompt = np.full(b, 3, np.int32)
    t = SamplingTensors.build(rows, b)
    mesh = Mesh(np.array(jax.devices()[:shards]), ("vocab",))

    def sharded(*args):
        spec = (P(None, "vocab"),) + (P(),) * (len(args) - 1)
        f = jax.shard_map(lambda *a: sample(*a, vocab_axis="vocab"), mesh=mesh, in_specs=spec, out_specs=P(),
                          check_vma=False)
        return jax.jit(f)(*args)

    for extras in ((), (history, num_prompt)):
        want = sample_jit(logits, t, *extras)
        got = sharded(jnp.asarray(logits), t, *extras)
        np.testing.assert_array_equal(np.asarray(got.token_ids), np.asarray(want.token_ids))
        np.testing.assert_array_equal(np.asarray(got.top_ids), np.asarray(want.top_ids))
        np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(want.logprobs), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.top_logprobs), np.asarray(want.top_logprobs), rtol=1e-5, atol=1e-5)
    assert int(got.token_ids[4]) == 7 and int(got.token_ids[11]) == far


def test_noise_of_a_vocabulary_slice_is_jax_random_gumbel_sliced():
    from engine.sampling import Vocab, _gumbel

    seed, step = jnp.array([0, 7, 2**32 - 1], jnp.uint32), jnp.array([0, 3, 99])
    got = _gumbel(seed, step, Vocab(None, 10, 50, 300))
    want = [jax.random.gumbel(jax.random.fold_in(jax.random.key(s), n), (300,), jnp.float32)[10:60]
            for s, n in zip(seed, step)]
    np.testing.assert_array_equal(np.asarray(got), np.stack(want))


def test_packed_rows_unpack_to_the_same_tensors():
    """A step receives its rows' sampling parameters inside its one int32 transfer: every field,
    float bits, uint32 seeds and padding included, comes back as `build` makes it."""
    from engine.sampling import PACKED_WIDTH

    rows = [row(seed=2**32 - 3, step=9, suppress=(1, 2), temperature=0.7, top_k=5, top_p=0.9, min_p=0.1,
                presence_penalty=0.3, frequency_penalty=-0.2, repetition_penalty=1.1, logit_bias={3: -2.5, 7: 1.5}),
            None, row(temperature=0.0)]
    packed = SamplingTensors.pack(rows, 4)
    assert packed.shape == (4, PACKED_WIDTH) and packed.dtype == np.int32
    want, got = SamplingTensors.build(rows, 4), jax.jit(SamplingTensors.unpack)(packed)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
