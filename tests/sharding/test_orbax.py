"""`pagedjax convert` writes an Orbax folder; it restores onto any mesh with the same outputs.

Saved at tp=1 and served at tp=4 (and dp=2 x tp=2), saved from tp=4 and served on
one device; the awkward-heads checkpoint restores padded onto tp=2.
"""

import json
from pathlib import Path

import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P
from parallel_workload import SMALL, run_workload

from engine.config import EngineConfig
from engine.engine import LLMEngine
from models.default import default_model_path
from server.cli import main

ODD_GQA = Path(__file__).parent.parent / "golden" / "tiny" / "odd_gqa"


def _engine(model, dp=1, tp=1, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(model), dtype="float32", dp=dp, tp=tp, **{**SMALL, **overrides}),
                     progress=False)


def _convert(tmp_path, name, model, tp=1) -> Path:
    out = tmp_path / name
    argv = ["convert", "--model", str(model), "--out", str(out), "--dtype", "float32", "--tp", str(tp),
            "--tokenizer", str(default_model_path())]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def preset_outputs():
    return run_workload(_engine("tiny"))


def test_saved_at_tp1_serves_at_tp4_and_on_dp2_tp2(tmp_path, preset_outputs):
    folder = _convert(tmp_path, "tiny-tp1", "tiny")
    assert json.loads((folder / "pagedjax_model.json").read_text())["model_config"]["num_heads"] == 6
    engine = _engine(folder, tp=4)
    qkv = dict(nnx.to_flat_state(engine.runner.params))[("layers", 0, "attn", "qkv")].get_value()
    assert qkv.sharding.spec == P(None, "model", None, None)
    assert qkv.shape[1:3] == (4, 2 + 2)  # 6 query / 2 KV heads: each KV head twice, 2 of its 3 query heads per copy
    assert run_workload(engine) == preset_outputs
    assert run_workload(_engine(folder, dp=2, tp=2)) == preset_outputs


def test_saved_at_tp4_serves_on_one_device(tmp_path, preset_outputs):
    folder = _convert(tmp_path, "tiny-tp4", "tiny", tp=4)
    engine = _engine(folder)
    assert engine.tokenizer.vocab_size > 0  # the folder carries its tokenizer
    assert run_workload(engine) == preset_outputs


def test_awkward_heads_restore_padded(tmp_path):
    golden = json.loads((ODD_GQA / "greedy.json").read_text())
    folder = _convert(tmp_path, "odd-gqa", ODD_GQA)
    engine = _engine(folder, tp=2, num_pages=32)
    outputs = run_workload(engine, prompts=[c["prompt_ids"] for c in golden["cases"]],
                           max_tokens=golden["max_new_tokens"])
    assert [o[0] for o in outputs] == [c["new_ids"] for c in golden["cases"]]
