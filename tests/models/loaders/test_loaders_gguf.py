"""GGUF files: dequantization against independent block decoders, names, Q/K row order, config, errors.

The block decoders below are written from the published block layouts (llama.cpp's
ggml-common.h / ggml-quants.c), element by element, so they share no code with the
vectorised `gguf.quants` the loader uses.
"""

import gguf
import ml_dtypes
import numpy as np
import pytest
from ckpt_builders import TINY, tiny_hf_weights, write_gguf

from models.loaders import CheckpointError, gguf_file, iter_tensors, read_config

T = gguf.GGMLQuantizationType

# ---- independent block decoders: bytes of one row -> float32 values


def _f16(b: np.ndarray) -> np.float32:
    return np.float32(b[:2].view(np.float16)[0])


def _q8_0(b):  # 34 bytes: f16 d, int8 q[32]; x = d * q
    return _f16(b) * b[2:34].view(np.int8).astype(np.float32)


def _q4_0(b):  # 18 bytes: f16 d, 16 bytes of nibbles; x[j] = d * (lo(j) - 8), x[j+16] = d * (hi(j) - 8)
    d, qs = _f16(b), b[2:18].astype(np.int32)
    out = np.empty(32, np.float32)
    for j in range(16):
        out[j] = ((qs[j] & 0x0F) - 8) * d
        out[j + 16] = ((qs[j] >> 4) - 8) * d
    return out


def _q4_1(b):  # 20 bytes: f16 d, f16 m, 16 bytes of nibbles; x = d * q + m
    d, m, qs = _f16(b), _f16(b[2:]), b[4:20].astype(np.int32)
    out = np.empty(32, np.float32)
    for j in range(16):
        out[j] = (qs[j] & 0x0F) * d + m
        out[j + 16] = (qs[j] >> 4) * d + m
    return out


def _q4_k(b):  # 144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles
    d, dmin, sc, qs = _f16(b), _f16(b[2:]), b[4:16].astype(np.int32), b[16:144].astype(np.int32)

    def scale_min(j):  # 8 sub-blocks of 32, each with a 6-bit scale and a 6-bit min
        if j < 4:
            return sc[j] & 63, sc[j + 4] & 63
        return (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)

    out = np.empty(256, np.float32)
    for chunk in range(4):  # 64 values per chunk: low nibbles of 32 bytes, then their high nibbles
        s1, m1 = scale_min(2 * chunk)
        s2, m2 = scale_min(2 * chunk + 1)
        for l in range(32):
            q = qs[32 * chunk + l]
            out[64 * chunk + l] = d * np.float32(s1) * (q & 0x0F) - dmin * np.float32(m1)
            out[64 * chunk + 32 + l] = d * np.float32(s2) * (q >> 4) - dmin * np.float32(m2)
    return out


def _q6_k(b):  # 210 bytes: 128 bytes low nibbles, 64 bytes high 2-bit pairs, int8 scales[16], f16 d
    ql, qh, sc, d = b[0:128].astype(np.int32), b[128:192].astype(np.int32), b[192:208].view(np.int8), _f16(b[208:])
    out = np.empty(256, np.float32)
    for half in range(2):  # 128 values each
        l0, h0, s0, y0 = 64 * half, 32 * half, 8 * half, 128 * half
        for l in range(32):
            i = l // 16
            q1 = ((ql[l0 + l] & 0x0F) | (((qh[h0 + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[l0 + l + 32] & 0x0F) | (((qh[h0 + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[l0 + l] >> 4) | (((qh[h0 + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[l0 + l + 32] >> 4) | (((qh[h0 + l] >> 6) & 3) << 4)) - 32
            out[y0 + l] = d * np.float32(sc[s0 + i]) * q1
            out[y0 + l + 32] = d * np.float32(sc[s0 + i + 2]) * q2
            out[y0 + l + 64] = d * np.float32(sc[s0 + i + 4]) * q3
            out[y0 + l + 96] = d * np.float32(sc[s0 + i + 6]) * q4
    return out


BLOCK_DECODERS = {T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q4_K: _q4_k, T.Q6_K: _q6_k}


def reference_dequantize(stored: np.ndarray, qtype) -> np.ndarray:
    """Decode stored data (as written to the file) into float32 [rows, cols]."""
    if qtype is None:
        return stored.astype(np.float32)
    if qtype == T.BF16:  # the top 16 bits of a float32
        return (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    _, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = stored.reshape(stored.shape[0], -1, block_bytes)
    return np.stack([np.concatenate([BLOCK_DECODERS[qtype](blk) for blk in row]) for row in blocks])


def encode(original: np.ndarray, qtype, rng) -> np.ndarray:
    """Data to store for `original` (float32 [rows, cols]); K-quants get random valid blocks instead."""
    if qtype is None:
        return original
    if qtype in (T.Q4_K, T.Q6_K):  # gguf.quants cannot encode these: random bytes, sane f16 scales
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        raw = rng.integers(0, 256, (original.shape[0], original.shape[1] // block, size), dtype=np.uint8)
        scales = rng.uniform(0.01, 0.1, raw.shape[:2] + (2,)).astype(np.float16).view(np.uint8)
        if qtype == T.Q4_K:
            raw[..., 0:4] = scales  # d, dmin
        else:
            raw[..., 208:210] = scales[..., :2]  # d
        return raw.reshape(original.shape[0], -1)
    return gguf.quants.quantize(original, qtype)


def embed_entry(rng):
    return {"token_embd.weight": (rng.standard_normal((TINY["vocab"], TINY["hidden"])).astype(np.float32), None)}


# Relative RMS error of the dequantized weight against the float32 it was encoded from.
TYPES = {None: 0.0, "F16": 1e-3, T.BF16: 5e-3, T.Q8_0: 0.01, T.Q4_0: 0.15, T.Q4_1: 0.15, T.Q4_K: None, T.Q6_K: None}


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: "F32" if t is None else getattr(t, "name", t))
def test_dequantize_matches_block_decoders(tmp_path, rng, qtype):
    original = rng.standard_normal((8, 512)).astype(np.float32)  # [out, in]; 512 = 2 K-quant superblocks
    if qtype == "F16":
        stored, raw_type = original.astype(np.float16), None
    else:
        stored, raw_type = encode(original, qtype, rng), qtype
    path = write_gguf(tmp_path / "m.gguf", "llama", embed_entry(rng) | {"blk.0.ffn_up.weight": (stored, raw_type)})

    got = dict(iter_tensors(path))["model.layers.0.mlp.up_proj.weight"]

    assert got.shape == (8, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_dequantize(stored, raw_type), rtol=1e-6, atol=1e-6)
    if TYPES[qtype] is not None:  # also right layout: close to what was encoded
        err = np.linalg.norm(got - original) / np.linalg.norm(original)
        assert err <= TYPES[qtype]


def test_chunked_dequantize_and_bf16_output(tmp_path, rng, monkeypatch):
    stored = encode(np.zeros((10, 512), np.float32), T.Q4_K, rng)
    path = write_gguf(tmp_path / "m.gguf", "llama", embed_entry(rng) | {"blk.1.ffn_down.weight": (stored, T.Q4_K)})
    expected = reference_dequantize(stored, T.Q4_K)
    monkeypatch.setattr(gguf_file, "_CHUNK_BYTES", 3 * 512 * 4)  # 3 rows per step, 10 rows: uneven chunks
    got = dict(iter_tensors(path, "bfloat16"))["model.layers.1.mlp.down_proj.weight"]
    assert got.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got.view(np.uint16), expected.astype(ml_dtypes.bfloat16).view(np.uint16))


# ---- names and the Q/K row order

HF_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf: str) -> str:
    stem, kind = hf.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{HF_TO_GGUF[rest]}.{kind}"
    return f"{HF_TO_GGUF[stem]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to HF Q/K rows (weight or bias): per head, interleave the halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_hf_as_gguf(path, arch, weights, permute: bool, **meta):
    heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}
    tensors = {}
    for hf, w in weights.items():
        name = gguf_name(hf)
        kind = name.split(".")[-2]
        if permute and kind in heads:
            w = llama_cpp_permute(w, heads[kind])
        tensors[name] = (np.ascontiguousarray(w), None)
    return write_gguf(path, arch, tensors, **meta)


@pytest.mark.parametrize(
    "gguf, hf",
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output.weight", "lm_head.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("blk.12.attn_output.weight", "model.layers.12.self_attn.o_proj.weight"),
        ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.3.attn_norm.weight", "model.layers.3.input_layernorm.weight"),
        ("blk.1.ffn_gate.weight", "model.layers.1.mlp.gate_proj.weight"),
        ("rope_freqs.weight", None),
        ("blk.0.attn_q_norm.weight", None),
        ("blk.0.attn_q.scale", None),
    ],
)
def test_hf_name(gguf, hf):
    assert gguf_file.hf_name(gguf) == hf


@pytest.mark.parametrize("arch, permuted", [("llama", True), ("qwen2", False)])
def test_every_tensor_comes_back_in_hf_form(tmp_path, rng, arch, permuted):
    weights = tiny_hf_weights(rng, bias=True)
    path = write_hf_as_gguf(tmp_path / "m.gguf", arch, weights, permute=permuted)
    got = dict(iter_tensors(path))
    assert got.keys() == weights.keys()
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w, err_msg=name)


def rope_adjacent_pairs(x, pos, theta=10000.0):
    """llama.cpp's RoPE for llama (GGML_ROPE_TYPE_NORM): rotates (x0, x1), (x2, x3), ... of each head."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
    return out


def rope_rotate_half(x, pos, theta=10000.0):
    """HF transformers' RoPE: rotates (x_i, x_{i+d/2}) of each head by the same angles."""
    d = x.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], axis=-1)


def test_unpermuted_weights_with_hf_rope_give_llama_cpp_attention_scores(tmp_path, rng):
    """The file's own Q/K with llama.cpp's RoPE, and ours with HF's RoPE, must score alike."""
    weights = tiny_hf_weights(rng, bias=True)
    path = write_hf_as_gguf(tmp_path / "m.gguf", "llama", weights, permute=True)
    ours = dict(iter_tensors(path))
    raw = {t.name: np.array(t.data, np.float64) for t in gguf.GGUFReader(path).tensors}  # as llama.cpp sees them

    h, kv, d = TINY["heads"], TINY["kv_heads"], TINY["head_dim"]
    x = rng.standard_normal((2, TINY["hidden"]))  # two tokens' hidden states

    def project(w, b, token, n):  # -> (n, d)
        return (w @ x[token] + b).reshape(n, d)

    def scores(rope, q_w, q_b, k_w, k_b, pos_q, pos_k):
        q = rope(project(q_w, q_b, 0, h), pos_q)
        k = rope(project(k_w, k_b, 1, kv), pos_k)
        return np.einsum("hd,hd->h", q, np.repeat(k, h // kv, axis=0))  # query head i reads KV head i // (h/kv)

    p = "model.layers.0.self_attn."
    cpp = (raw["blk.0.attn_q.weight"], raw["blk.0.attn_q.bias"], raw["blk.0.attn_k.weight"], raw["blk.0.attn_k.bias"])
    hf = tuple(ours[p + n].astype(np.float64) for n in ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"))
    for pos_q, pos_k in [(0, 0), (5, 2), (17, 16), (100, 3)]:
        expected = scores(rope_adjacent_pairs, *cpp, pos_q, pos_k)
        np.testing.assert_allclose(scores(rope_rotate_half, *hf, pos_q, pos_k), expected, rtol=1e-9, atol=1e-9)
        if pos_q != pos_k:  # control: the file's rows as they are, with HF's RoPE, score differently
            assert not np.allclose(scores(rope_rotate_half, *cpp, pos_q, pos_k), expected, rtol=1e-3, atol=1e-3)


# ---- config from metadata


def test_config_from_metadata(tmp_path, rng):
    weights = tiny_hf_weights(rng)
    path = write_hf_as_gguf(
        tmp_path / "m.gguf", "llama", weights, permute=True,
        **{"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "vocab_size": TINY["vocab"]},
    )
    assert read_config(path) == {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "rms_norm_eps": 1e-6,  # stored as float32; read back as the decimal that was written
        "rope_theta": 10000.0,
        "max_position_embeddings": 128,
        "vocab_size": 32,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def test_config_of_a_tied_qwen2_file_with_rope_scaling(tmp_path, rng):
    weights = {n: w for n, w in tiny_hf_weights(rng, bias=True).items() if n != "lm_head.weight"}
    meta = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32}
    config = read_config(write_hf_as_gguf(tmp_path / "m.gguf", "qwen2", weights, permute=False, **meta))
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["tie_word_embeddings"] is True
    assert config["vocab_size"] == TINY["vocab"]  # no vocab_size key: rows of token_embd
    assert config["attention_bias"] is True
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    assert "lm_head.weight" not in dict(iter_tensors(tmp_path / "m.gguf"))


def test_linear_rope_scaling(tmp_path, rng):
    meta = {"rope.scaling.type": "linear", "rope.scaling.factor": 2.0}
    path = write_gguf(tmp_path / "m.gguf", "llama", embed_entry(rng), **meta)
    assert read_config(path)["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}


# ---- files that cannot be loaded


def test_truncated_file(tmp_path, rng):
    path = write_hf_as_gguf(tmp_path / "m.gguf", "llama", tiny_hf_weights(rng), permute=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size - 100])
    with pytest.raises(CheckpointError, match=r"m\.gguf: not a valid GGUF file.*truncated or corrupt"):
        read_config(path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(CheckpointError, match=r"x\.gguf: not a valid GGUF file"):
        iter_tensors(tmp_path / "x.gguf")


def test_unsupported_architecture(tmp_path, rng):
    path = write_gguf(tmp_path / "m.gguf", "falcon", embed_entry(rng))
    with pytest.raises(CheckpointError, match=r"m\.gguf: GGUF architecture 'falcon' is not supported"):
        read_config(path)


def test_llama3_rope_factors_are_refused(tmp_path, rng):
    tensors = embed_entry(rng) | {"rope_freqs.weight": (np.ones(2, np.float32), None)}
    with pytest.raises(CheckpointError, match="rope_freqs.*safetensors"):
        read_config(write_gguf(tmp_path / "m.gguf", "llama", tensors))


def test_split_file_is_refused(tmp_path, rng):
    path = write_gguf(tmp_path / "m-00001-of-00002.gguf", "llama", embed_entry(rng), **{"split.count": 2})
    with pytest.raises(CheckpointError, match="llama-gguf-split --merge"):
        iter_tensors(path)


def test_unknown_tensor_is_refused(tmp_path, rng):
    tensors = embed_entry(rng) | {"blk.0.attn_q_norm.weight": (np.ones(4, np.float32), None)}
    with pytest.raises(CheckpointError, match="'blk.0.attn_q_norm.weight' has no counterpart"):
        iter_tensors(write_gguf(tmp_path / "m.gguf", "llama", tensors))


def test_integer_tensor_is_refused(tmp_path, rng):
    tensors = embed_entry(rng) | {"blk.0.ffn_up.weight": (np.ones((4, 8), np.int32), None)}
    with pytest.raises(CheckpointError, match="stored as I32, which cannot be dequantized"):
        list(iter_tensors(write_gguf(tmp_path / "m.gguf", "llama", tensors)))
