"""Model config: reading HF config.json dicts, refusals with useful messages, presets, and the registry."""

import json
from pathlib import Path

import pytest

from models import ConfigError, ModelConfig, UnsupportedArchitecture, model_class, supported_architectures

GOLDEN = Path(__file__).parents[1] / "golden" / "tiny"


def hf(name: str) -> dict:
    return json.loads((GOLDEN / name / "config.json").read_text())


def test_reads_golden_configs():
    qwen = ModelConfig.from_hf(hf("qwen2"))
    assert qwen.qkv_bias and not qwen.o_bias and qwen.architecture == "Qwen2ForCausalLM"
    odd = ModelConfig.from_hf(hf("odd_gqa"))
    assert (odd.num_heads, odd.num_kv_heads) == (9, 3)
    assert ModelConfig.from_hf(hf("tied")).tie_word_embeddings
    llama3 = ModelConfig.from_hf(hf("llama3"))
    assert llama3.rope_scaling is not None and llama3.rope_scaling.kind == "llama3"


def test_sliding_window_is_refused_unless_it_covers_the_context():
    cfg = hf("mistral") | {"sliding_window": 16, "max_position_embeddings": 512}
    with pytest.raises(ConfigError, match="sliding_window=16 is smaller than max_position_embeddings=512"):
        ModelConfig.from_hf(cfg)
    ModelConfig.from_hf(cfg | {"sliding_window": 512})  # as large as the context: plain attention
    qwen = hf("qwen2") | {"sliding_window": 16, "use_sliding_window": False}
    ModelConfig.from_hf(qwen)  # Qwen2 only uses the window when asked to


def test_bad_values_name_the_field():
    with pytest.raises(ConfigError, match="num_attention_heads \\(10\\) must be a multiple of num_key_value_heads \\(4\\)"):
        ModelConfig.tiny(num_heads=10, num_kv_heads=4)
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf(hf("llama2") | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(UnsupportedArchitecture) as e:
        model_class("GPT2LMHeadModel")
    for name in supported_architectures():
        assert name in str(e.value)


def test_presets_have_the_benchmark_shapes():
    assert ModelConfig.smollm2_135m().num_params == 134_515_008
    assert abs(ModelConfig.llama31_8b().num_params / 1e9 - 8.03) < 0.01
    assert abs(ModelConfig.llama32_1b().num_params / 1e9 - 1.24) < 0.01
