"""Where the model and tokenizer come from: a checkpoint path, a preset name, or the default.

Presets build random weights at a real model's shape (for benchmarks and tests);
they use the default model's tokenizer, so text still goes in and out. Weights
are placed on the engine's mesh as they are read (or drawn), with their attention
heads laid out for its model axis (sharding.heads). `convert` writes any of these
as an Orbax folder, which loads here like the others.
"""

import json
import logging
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from engine.config import EngineConfig
from engine.tokenizer import Tokenizer
from models import ModelConfig, load_model, random_model
from models.loading import model_config
from models.orbax_checkpoint import save_model
from sharding import MODEL, Placement, head_layout, make_mesh

log = logging.getLogger(__name__)

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


def _placement(mesh: Mesh, cfg: ModelConfig, pad_heads: bool) -> Placement:
    heads = head_layout(cfg.num_heads, cfg.num_kv_heads, mesh.shape[MODEL]) if pad_heads else None
    if heads is not None and not heads.is_identity:
        log.warning(heads.describe())
    return Placement(mesh, heads)


def load_model_and_tokenizer(config: EngineConfig, mesh: Mesh | None = None, pad_heads: bool = True):
    """Returns (model, model_config, tokenizer, model_name, dtype, placement), the weights placed on
    `mesh` (default: one device). Without `pad_heads` the heads stay as in the checkpoint (for saving)."""
    mesh = mesh or make_mesh(1, 1)
    dtype = resolve_dtype(config.dtype)
    name = config.model
    if name in PRESETS:
        cfg = PRESETS[name]()
        placement = _placement(mesh, cfg, pad_heads)
        model = random_model(cfg, dtype, seed=config.seed, place=placement)
        tokenizer = Tokenizer.from_path(config.tokenizer or default_model_path())
        return model, cfg, tokenizer, name, dtype, placement
    path = name or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"model {path!r} is neither an existing HF folder, .gguf file or converted Orbax folder "
            f"nor a preset ({', '.join(sorted(PRESETS))})"
        )
    placement = _placement(mesh, model_config(path), pad_heads)
    model, cfg = load_model(path, dtype, place=placement)
    tokenizer = Tokenizer.from_path(config.tokenizer or path)
    model_name = os.path.basename(os.path.normpath(path))
    if model_name.endswith(".gguf"):
        model_name = model_name[: -len(".gguf")]
    return model, cfg, tokenizer, model_name, dtype, placement


def convert(model: str | None, out_dir: str | os.PathLike, dtype: str = "auto", tokenizer: str | None = None,
            tp: int = 1) -> Path:
    """Write a checkpoint (HF folder, .gguf file or preset) as an Orbax folder that `LLM(model=out_dir)` serves
    at any tp and dp; `tp` spreads the weights over that many devices while converting."""
    config = EngineConfig(model=model, dtype=dtype, tokenizer=tokenizer, tp=tp)
    loaded, _, tok, _, _, _ = load_model_and_tokenizer(config, make_mesh(1, tp), pad_heads=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_model(loaded, out)
    if jax.process_index() == 0:
        _save_tokenizer(tok, out)
    return out


def _save_tokenizer(tok: Tokenizer, folder: Path) -> None:
    """The tokenizer as HF files (tokenizer.json and its special tokens, chat template and EOS ids)."""
    tok.backend.save(str(folder / "tokenizer.json"))
    special = {"bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
               "unk_token": tok.unk_token, "chat_template": tok.chat_template}
    (folder / "tokenizer_config.json").write_text(json.dumps({k: v for k, v in special.items() if v is not None}, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": sorted(tok.eos_token_ids)}, indent=2))
