"""Our models' logits against HF transformers, run through the paged path.

The reference data come from tests/golden/make_model_golden.py (HF transformers on
CPU in float32; tests/golden/README.md lists the files). Errors are measured against
the logits' scale, max |HF logit| over the sequence:

- tiny random-weight checkpoints (Llama 3 RoPE scaling, Qwen2 biases, 9/3 grouped
  heads, tied head, Mistral, Llama 2 MHA): every position, float32 and bfloat16;
- SmolLM2-135M-Instruct Q4_1 GGUF (slow): the last 4 positions in full, and the
  max, min and argmax at every position, float32.

Observed errors are attached to each test with `record_property` and printed (`-s`).
"""

from pathlib import Path

import numpy as np
import pytest

from models import load_model
from models.default import default_model_path
from models.testing import forward_dense

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
TINY = ["llama3", "qwen2", "odd_gqa", "tied", "mistral", "llama2"]

# float32: the bound the model must meet. Two float32 implementations of a 2-layer
# model differ by ~2e-6 of the scale; a real mistake (RoPE layout or scaling, head
# grouping, a missing bias) is off by 1e-1 or more.
F32_TOL = 1e-4
# bfloat16 keeps 8 significant bits (rounding error up to 2^-9 = 2e-3 per value) and
# every weight and activation is rounded. These weights (std 0.2) give a residual
# stream of ~10, and HF itself, run in bfloat16 on these checkpoints, is up to 6e-2 of
# the scale away from its float32 logits (2e-2 to 3e-2 in RMS). The bounds leave room
# over that and still catch a wrong model: dropping Llama 3's RoPE scaling is off by
# 2.4e-1 of the scale (1.4e-1 RMS) on a 7-token sequence, and by 1 on longer ones.
BF16_TOL = 1e-1
BF16_RMS_TOL = 5e-2  # RMS of the error over the RMS of HF's logits
# SmolLM2, 30 layers in float32: HF's own float32 logits are 2e-6 of the scale away
# from its float64 ones, and ours are as close; 2e-5 leaves a 10x margin.
SMOLLM2_TOL = 2e-5


def load_sequences(npz: Path, key: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(input_ids, reference), ...] for the arrays input_ids_<i> and <key>_<i> of a golden file."""
    with np.load(npz, allow_pickle=False) as data:
        count = sum(1 for k in data.files if k.startswith("input_ids_"))
        return [(data[f"input_ids_{i}"], data[f"{key}_{i}"]) for i in range(count)]


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Best minus second-best logit along the last axis."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def check_against_hf(name: str, dtype: str, tol: float, rms_tol: float, record_property) -> None:
    model, _ = load_model(GOLDEN / "tiny" / name, dtype=dtype)
    worst, worst_rms = 0.0, 0.0
    for i, (ids, hf) in enumerate(load_sequences(GOLDEN / "tiny" / name / "logits.npz", "logits")):
        ours = forward_dense(model, ids)
        assert ours.shape == hf.shape, (ours.shape, hf.shape)
        assert np.isfinite(ours).all()
        scale = float(np.abs(hf).max())
        rel = float(np.abs(ours - hf).max()) / scale
        rel_rms = float(np.sqrt(np.mean((ours - hf) ** 2) / np.mean(hf**2)))
        worst, worst_rms = max(worst, rel), max(worst_rms, rel_rms)
        record_property(f"seq{i}_len{len(ids)}_max_err_over_scale", f"{rel:.3e}")
        record_property(f"seq{i}_len{len(ids)}_rms_err_over_rms", f"{rel_rms:.3e}")
        where = f"{name} {dtype} sequence {i} (T={len(ids)})"
        assert rel <= tol, f"{where}: max |ours - HF| = {rel:.3e} of scale > {tol}"
        assert rel_rms <= rms_tol, f"{where}: RMS error = {rel_rms:.3e} of RMS(HF) > {rms_tol}"
        # Where HF's best logit leads by more than both errors could close, the argmax must agree.
        clear = top2_margin(hf) > 2 * tol * scale
        np.testing.assert_array_equal(ours.argmax(-1)[clear], hf.argmax(-1)[clear], err_msg=where)
    print(f"\n{name} {dtype}: max |ours - HF| / scale = {worst:.3e}, RMS error / RMS(HF) = {worst_rms:.3e}")


@pytest.mark.parametrize("name", TINY)
def test_tiny_float32_matches_hf(name, record_property):
    check_against_hf(name, "float32", F32_TOL, F32_TOL, record_property)


@pytest.mark.parametrize("name", TINY)
def test_tiny_bfloat16_close_to_hf(name, record_property):
    check_against_hf(name, "bfloat16", BF16_TOL, BF16_RMS_TOL, record_property)


@pytest.fixture(scope="module")
def smollm2():
    model, _ = load_model(default_model_path(), dtype="float32")
    return model


@pytest.mark.slow
def test_smollm2_float32_matches_hf(smollm2, record_property):
    with np.load(GOLDEN / "smollm2" / "logits.npz", allow_pickle=False) as npz:
        golden = {k: npz[k] for k in npz.files}
    for i, prompt in enumerate(map(str, golden["prompts"])):
        ids, hf_last4, hf_argmax = golden[f"input_ids_{i}"], golden[f"logits_last4_{i}"], golden[f"argmax_{i}"]
        hf_max, hf_min = golden[f"logits_max_{i}"], golden[f"logits_min_{i}"]
        ours = forward_dense(smollm2, ids)  # (T, V)
        assert ours.shape == (len(ids), hf_last4.shape[1])
        scale = float(max(np.abs(hf_max).max(), np.abs(hf_min).max()))

        err_last4 = float(np.abs(ours[-4:] - hf_last4).max())
        err_extremes = float(max(np.abs(ours.max(-1) - hf_max).max(), np.abs(ours.min(-1) - hf_min).max()))
        record_property(f"prompt{i}_last4_max_abs_err", f"{err_last4:.3e}")
        record_property(f"prompt{i}_last4_max_err_over_scale", f"{err_last4 / scale:.3e}")
        print(
            f"\nSmolLM2 {prompt!r} (T={len(ids)}, scale {scale:.2f}): last-4 max |ours - HF| = {err_last4:.3e}"
            f" ({err_last4 / scale:.3e} of scale); per-position max/min: {err_extremes:.3e}"
        )
        assert err_last4 <= SMOLLM2_TOL * scale, f"{prompt!r}: last-4 logits off by {err_last4 / scale:.3e} of scale"
        assert err_extremes <= SMOLLM2_TOL * scale, f"{prompt!r}: per-position max/min off by {err_extremes:.3e}"

        assert ours[-1].argmax() == hf_argmax[-1], f"{prompt!r}: next token differs from HF"
        clear = golden[f"top2_margin_{i}"] > 2 * SMOLLM2_TOL * scale
        assert clear.all(), "the golden prompts were chosen so that no position is a near tie"
        np.testing.assert_array_equal(ours.argmax(-1), hf_argmax, err_msg=prompt)
