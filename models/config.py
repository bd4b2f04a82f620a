"""The model configuration: one frozen dataclass for the whole Llama family.

Filled from an HF `config.json` dict (`ModelConfig.from_hf`), from GGUF metadata
(the loader turns it into the same dict), or from a preset classmethod
(`ModelConfig.llama31_8b(**override)`) for the benchmark shapes.
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy as np


class ConfigError(ValueError):
    """A model configuration we cannot run; the message says which field and why."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style frequency-dependent RoPE scaling ("llama3"), or plain linear scaling."""

    kind: str  # "llama3" or "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF `architectures[0]`, the registry key
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v
    o_bias: bool = False  # Llama's `attention_bias` puts one on o_proj too
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"model config: {name} must be a positive integer (got {getattr(self, name)!r})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model config: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim must be even for RoPE (got {self.head_dim})")

    # ---- construction -------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """Read an HF `config.json` dict of a Llama, Mistral, Qwen2 or SmolLM model."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = hf["num_attention_heads"]
        hidden = hf["hidden_size"]
        window = hf.get("sliding_window")
        uses_window = window is not None and (arch != "Qwen2ForCausalLM" or hf.get("use_sliding_window", False))
        if uses_window and window < hf.get("max_position_embeddings", 0):
            raise ConfigError(
                f"model config: sliding_window={window} is smaller than max_position_embeddings="
                f"{hf.get('max_position_embeddings')}; sliding-window attention is not supported yet. "
                "Set sliding_window to null in config.json if the model works with full attention."
            )
        eos = hf.get("eos_token_id")
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hidden // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6 if is_qwen2 else 1e-5),
            rope_theta=float(_rope_parameters(hf).get("rope_theta", hf.get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
            o_bias=not is_qwen2 and bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
        )

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- presets (shapes from the benchmark table; weights are random) ------------

    @classmethod
    def smollm2_135m(cls, **override) -> "ModelConfig":
        return cls(**{**dict(
            architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576, intermediate_size=1536,
            num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rope_theta=100000.0,
            max_position_embeddings=8192, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
        ), **override})

    @classmethod
    def llama32_1b(cls, **override) -> "ModelConfig":
        return cls(**{**dict(
            architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
            num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rope_theta=500000.0,
            rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
            tie_word_embeddings=True, bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        ), **override})

    @classmethod
    def llama31_8b(cls, **override) -> "ModelConfig":
        return cls(**{**dict(
            architecture="LlamaForCausalLM", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
            num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rope_theta=500000.0,
            rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
            bos_token_id=128000, eos_token_ids=(128001, 128008, 128009),
        ), **override})

    @classmethod
    def llama31_70b(cls, **override) -> "ModelConfig":
        return cls.llama31_8b(**{**dict(
            hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8,
        ), **override})

    @classmethod
    def tiny(cls, **override) -> "ModelConfig":
        """A few-layer model with odd GQA for fast CPU tests; its vocabulary fits the default tokenizer."""
        return cls(**{**dict(
            architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=96, intermediate_size=192,
            num_layers=2, num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=1024,
        ), **override})

    # ---- derived ------------------------------------------------------------------

    def rope_inv_freq(self) -> np.ndarray:
        """(head_dim // 2,) float32 inverse frequencies, with the config's scaling applied."""
        inv = 1.0 / (self.rope_theta ** (np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim))
        s = self.rope_scaling
        if s is None:
            return inv.astype(np.float32)
        if s.kind == "linear":
            return (inv / s.factor).astype(np.float32)
        # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth blend between.
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        blended = (1 - smooth) * inv / s.factor + smooth * inv
        out = np.where(wavelen > low_wavelen, inv / s.factor, np.where(wavelen < high_wavelen, inv, blended))
        return out.astype(np.float32)

    @property
    def num_params(self) -> int:
        e, f, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = e * d * (self.num_heads * 2 + self.num_kv_heads * 2)
        per_layer = attn + 3 * e * f + 2 * e
        embed = self.vocab_size * e * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embed + e


def _rope_parameters(hf: dict) -> dict:
    # Newer transformers nest theta and scaling under `rope_parameters`.
    return hf.get("rope_parameters") or {}


def _rope_scaling(hf: dict) -> RopeScaling | None:
    rs = hf.get("rope_scaling") or _rope_parameters(hf) or None
    if not rs:
        return None
    kind = rs.get("rope_type") or rs.get("type") or "default"
    if kind == "default":
        return None
    if kind == "llama3":
        return RopeScaling(
            "llama3",
            float(rs["factor"]),
            float(rs.get("low_freq_factor", 1.0)),
            float(rs.get("high_freq_factor", 4.0)),
            int(rs.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return RopeScaling("linear", float(rs["factor"]))
    raise ConfigError(f"model config: rope_scaling type {kind!r} is not supported (supported: llama3, linear)")
