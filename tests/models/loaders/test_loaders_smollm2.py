"""The real default model file, SmolLM2-135M-Instruct Q4_1: its facts, and values HF transformers reads from it."""

from pathlib import Path

import numpy as np
import pytest

from models.default import default_model_path
from models.loaders import load_params, read_config

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parents[2] / "golden" / "smollm2_gguf_slices.npz"  # from tests/golden/make_gguf_golden.py


@pytest.fixture(scope="module")
def path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def tensors(path) -> dict[str, np.ndarray]:
    """Every parameter, through load_params onto the (CPU) default device, viewed as numpy."""
    return {name: np.asarray(array) for name, array in load_params(path).items()}


def test_config_facts(path):
    config = read_config(path)
    assert config["architectures"] == ["LlamaForCausalLM"]
    expected = dict(
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5,
        max_position_embeddings=8192, vocab_size=49152, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2,
    )
    assert {k: config[k] for k in expected} == expected
    assert "rope_scaling" not in config


def test_parameter_count_and_shapes(tensors):
    assert len(tensors) == 2 + 30 * 9 and "lm_head.weight" not in tensors
    assert sum(a.size for a in tensors.values()) == 134_515_008
    layer = "model.layers.29."
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)
    assert tensors[layer + "self_attn.q_proj.weight"].shape == (576, 576)
    assert tensors[layer + "self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors[layer + "self_attn.o_proj.weight"].shape == (576, 576)
    assert tensors[layer + "mlp.gate_proj.weight"].shape == (1536, 576)
    assert tensors[layer + "mlp.down_proj.weight"].shape == (576, 1536)
    assert tensors[layer + "post_attention_layernorm.weight"].shape == (576,)


def test_values_match_hf_transformers(tensors):
    golden = np.load(GOLDEN)
    rows = golden["rows"]
    names = [n for n in golden.files if n != "rows"]
    assert len(names) == 10
    for name in names:
        ours = tensors[name] if tensors[name].ndim == 1 else tensors[name][rows]
        np.testing.assert_allclose(ours, golden[name], rtol=0, atol=1e-6, err_msg=name)

