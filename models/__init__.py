"""Model families, shared layers, paged attention, KV-cache layout and checkpoint loading."""

from models.attention import AttentionMetadata, paged_attention
from models.config import ConfigError, ModelConfig, RopeScaling
from models.kv_cache import allocate_kv_cache, kv_cache_bytes_per_page
from models.loading import load_model, random_model
from models.registry import UnsupportedArchitecture, model_class, register, supported_architectures

__all__ = [
    "AttentionMetadata",
    "ConfigError",
    "ModelConfig",
    "RopeScaling",
    "UnsupportedArchitecture",
    "allocate_kv_cache",
    "kv_cache_bytes_per_page",
    "load_model",
    "model_class",
    "paged_attention",
    "random_model",
    "register",
    "supported_architectures",
]
