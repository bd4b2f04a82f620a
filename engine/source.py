"""Where the model and tokenizer come from: a checkpoint path, a preset name, or the default.

Presets build random weights at a real model's shape (for benchmarks and tests);
they use the default model's tokenizer, so text still goes in and out.
"""

import os

import jax
import jax.numpy as jnp

from engine.config import EngineConfig
from engine.tokenizer import Tokenizer
from models import ModelConfig, load_model, random_model

PRESETS = {
    "smollm2-135m-random": ModelConfig.smollm2_135m,
    "llama-3.2-1b": ModelConfig.llama32_1b,
    "llama-3.1-8b": ModelConfig.llama31_8b,
    "llama-3.1-70b": ModelConfig.llama31_70b,
    "tiny": ModelConfig.tiny,
}


def default_model_path() -> str:
    from models.default import default_model_path as path

    return str(path())


def resolve_dtype(dtype: str):
    if dtype == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(dtype)


def load_model_and_tokenizer(config: EngineConfig, place=None):
    """Returns (model, model_config, tokenizer, model_name, dtype)."""
    dtype = resolve_dtype(config.dtype)
    name = config.model
    if name in PRESETS:
        cfg = PRESETS[name]()
        model = random_model(cfg, dtype, seed=config.seed)
        tokenizer = Tokenizer.from_path(config.tokenizer or default_model_path())
        return model, cfg, tokenizer, name, dtype
    path = name or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model {path!r} is neither an existing HF folder or .gguf file nor a preset "
            f"({', '.join(sorted(PRESETS))})"
        )
    model, cfg = load_model(path, dtype, place=place)
    tokenizer = Tokenizer.from_path(config.tokenizer or path)
    model_name = os.path.basename(os.path.normpath(path))
    if model_name.endswith(".gguf"):
        model_name = model_name[: -len(".gguf")]
    return model, cfg, tokenizer, model_name, dtype
