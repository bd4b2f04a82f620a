"""Tensor and data parallelism on 8 CPU devices: every mesh gives one device's greedy tokens.

Each (dp, tp) runs the same continuous-batching workload (parallel_workload.py) on
the random "tiny" preset (6 query / 2 KV heads, so tp=4 replicates KV heads), and
the awkward-heads checkpoint (9 query / 3 KV heads: tp=2 and tp=4 pad them) is
checked against HF transformers' own greedy tokens. Each run also checks where the
cache and the weights live and that nothing compiles after warm-up.
"""

import json
import math
import re
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from compiles import recorded_compiles
from parallel_workload import PROMPTS, SMALL, run_workload

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.params import SamplingParams
from engine.sampling import TOP_CANDIDATES
from models.default import default_model_path
from sharding import MeshError

ODD_GQA = Path(__file__).parent.parent / "golden" / "tiny" / "odd_gqa"
MESHES = [(1, 1), (1, 2), (2, 1), (2, 2), (1, 4), (2, 4), (4, 2), (8, 1)]


def _engine(model: str, dp: int, tp: int, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, tokenizer=str(default_model_path()), dtype="float32",
                                  dp=dp, tp=tp, **{**SMALL, **overrides}), progress=False)


def _run_without_compiling(engine: LLMEngine, **workload) -> list:
    with recorded_compiles() as compiles:
        outputs = run_workload(engine, **workload)
    assert compiles == [], "compiled after warm-up"
    return outputs


def _weights(engine: LLMEngine) -> dict[str, jax.Array]:
    """The served weights by name ("layers.0.attn.qkv", ...)."""
    return {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(engine.runner.params)}


def _check_placement(engine: LLMEngine, dp: int, tp: int) -> None:
    """The cache is split over KV heads (model) and pages (data); weights over heads, FFN and vocab."""
    flat = _weights(engine)
    qkv, o, gate_up, down, embed = (flat[k] for k in ("layers.0.attn.qkv", "layers.0.attn.o", "layers.0.mlp.gate_up",
                                                      "layers.0.mlp.down", "embed"))
    assert dict(qkv.sharding.mesh.shape) == {"data": dp, "model": tp}
    assert qkv.sharding.spec == P(None, "model", None, None)  # whole groups of q, k and v per device
    assert qkv.sharding.shard_shape(qkv.shape)[1] == qkv.shape[1] // tp
    assert o.sharding.spec == P("model", None, None)
    assert gate_up.sharding.spec == P(None, None, "model") and down.sharding.spec == P("model", None)
    assert embed.sharding.spec == P("model", None)
    assert flat["norm.weight"].sharding.is_fully_replicated
    num_pages = engine.config.num_pages
    for k_pages, v_pages in engine.runner.kv_cache:
        for pages in (k_pages, v_pages):
            kv = pages.shape[0]
            assert pages.shape == (kv, dp * num_pages, SMALL["page_size"], qkv.shape[3])
            assert pages.sharding.spec == P("model", "data", None, None)
            assert pages.sharding.shard_shape(pages.shape) == (kv // tp, num_pages, SMALL["page_size"], qkv.shape[3])


@pytest.fixture(scope="module")
def one_device():
    engine = _engine("tiny", 1, 1)
    outputs = _run_without_compiling(engine)
    # The pool is meant to be tight for one shard, so the meshes are compared on a run that preempts.
    assert engine.scheduler.num_preemptions_total > 0
    return outputs


@pytest.mark.parametrize(("dp", "tp"), MESHES[1:], ids=[f"dp{dp}-tp{tp}" for dp, tp in MESHES[1:]])
def test_mesh_matches_one_device(one_device, dp, tp):
    engine = _engine("tiny", dp, tp)
    _check_placement(engine, dp, tp)
    assert _run_without_compiling(engine) == one_device
    engine.step()  # finished sequences release their pages at the next step
    assert len(engine.scheduler.allocators) == dp  # one page pool per data shard
    for alloc in engine.scheduler.allocators:
        alloc.check_invariant([])
        assert alloc.num_free_pages == alloc.num_usable_pages


@pytest.mark.parametrize(("dp", "tp"), [(1, 2), (1, 4), (2, 2)], ids=["dp1-tp2", "dp1-tp4", "dp2-tp2"])
def test_awkward_heads_match_hf(dp, tp):
    """9 query / 3 KV heads on tp=2 and tp=4: zero-padded heads, HF's tokens."""
    golden = json.loads((ODD_GQA / "greedy.json").read_text())
    engine = _engine(str(ODD_GQA), dp, tp, num_pages=32)  # room for 30 + 24 tokens
    qkv = _weights(engine)["layers.0.attn.qkv"]
    assert qkv.shape[1:3] == (4, 3 + 2)  # 9 heads padded to 4 groups of 3, 4 KV heads
    assert engine.runner.kv_cache[0][0].shape[0] == 4
    prompts = [c["prompt_ids"] for c in golden["cases"]]
    outputs = _run_without_compiling(engine, prompts=prompts, max_tokens=golden["max_new_tokens"])
    expected = [c["new_ids"] for c in golden["cases"]]
    assert [o[0] for o in outputs] == expected
    assert outputs[2] == [expected[2]] * 2  # the n=2 request


def test_mesh_larger_than_devices_is_refused():
    with pytest.raises(MeshError, match=r"dp=4 x tp=4 needs 16 devices, but 8 cpu devices are visible"):
        _engine("tiny", 4, 4)


@pytest.mark.parametrize(("dp", "tp"), [(2, 1), (2, 2)], ids=["dp2-tp1", "dp2-tp2"])
def test_fused_decode_on_a_mesh_matches_one_device(one_device, dp, tp):
    """Several decode steps per call, on data and model shards, give the single-step tokens."""
    engine = _engine("tiny", dp, tp, decode_steps=4)
    fused = []
    dispatch_fused = engine.runner.dispatch_fused
    engine.runner.dispatch_fused = lambda *a, **kw: fused.append(1) or dispatch_fused(*a, **kw)
    assert _run_without_compiling(engine) == one_device
    assert fused, "no step was fused"
    # Collectives of a fused call: the model's all-reduces of (tokens, hidden) activations over the
    # model axis (two a layer, one for the vocabulary-split embedding); the sampler's merges of its
    # vocabulary shards' results, none wider than (rows, shards x candidates), but for one gather
    # of the logits that only the full-sort fallback of a "full" sampler graph runs; and the gathers of
    # the call's outputs. Left to XLA, the row-wise sampler would gather the logits every step, or
    # pay a collective per reduction. The other graphs have no branch at all (test_sampling).
    layers, cfg = engine.model_config.num_layers, engine.model_config
    for (_, sampler), exe in engine.runner._fused.items():
        full_rank = sampler == "full"
        found = [(kind, [int(d) for d in dims.split(",") if d])
                 for dims, kind in re.findall(r"= \w+\[([\d,]*)\]\S* (all-reduce|all-gather)(?:-start)?\(", exe.as_text())]
        activations = [dims for kind, dims in found if kind == "all-reduce" and dims[-1:] == [cfg.hidden_size]]
        whole_rows = [kind for kind, dims in found if cfg.vocab_size in dims]
        rest = [dims for kind, dims in found if dims[-1:] != [cfg.hidden_size] and cfg.vocab_size not in dims]
        assert len(activations) == (2 * layers + 1 if tp > 1 else 0), activations
        assert whole_rows == (["all-gather"] if tp > 1 and full_rank else []), whole_rows
        assert (" conditional(" in exe.as_text()) == full_rank
        assert all(_in_a_branch(exe.as_text(), f"{cfg.vocab_size}]") for _ in whole_rows)
        assert max(math.prod(dims) for dims in rest) <= runner_rows(engine) * 2 * tp * TOP_CANDIDATES, rest
    assert not any(" conditional(" in exe.as_text() for exe in engine.runner._steps.values())


def runner_rows(engine) -> int:
    """Sampler rows of the widest fused call, over all data shards and steps."""
    return engine.runner.decode_steps * engine.runner.dp * max(bk.rows for bk, _ in engine.runner._fused)


def _in_a_branch(hlo: str, shape: str) -> bool:
    """Whether the all-gather whose shape holds `shape` lies in a computation only a conditional runs."""
    computation = None
    for line in hlo.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split()[0].lstrip("%")
        elif "all-gather" in line and shape in line:
            return bool(re.search(rf"branch_computations={{[^}}]*%{re.escape(computation)}[,}}]", hlo))
    raise AssertionError(f"no all-gather of {shape}")


def test_seeded_sampling_is_the_same_on_vocabulary_shards():
    """A seeded request (temperature, top-k, top-p) draws the same tokens at tp=2 as on one device:
    each model shard samples on its own slice of the vocabulary with the noise of its own ids."""
    params = [SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=8, max_tokens=12, ignore_eos=True)]
    outputs = []
    for tp in (1, 2):
        engine = _engine("tiny", 1, tp)
        for i, p in enumerate(params):
            engine.add_request(f"s{i}", PROMPTS[i], p)
        done = {}
        while engine.has_unfinished_requests():
            done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        outputs.append([done[f"s{i}"] for i in range(len(params))])
    assert outputs[0] == outputs[1]
    assert len(set(outputs[0][0])) > 1  # sampled, not stuck on one token
