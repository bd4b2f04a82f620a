"""From HF `architectures` names to model classes.

Registering a class here is all it takes for `LLM(...)` and `pagedjax serve` to run
it; nothing in `engine/` changes. A model class takes `(config, dtype, rngs=...)`,
is called as `model(tokens, kv_cache, meta) -> (hidden, kv_cache)`, has
`logits(hidden)`, and maps checkpoint names with `hf_param_map(config)`.
"""

from models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
}


class UnsupportedArchitecture(ValueError):
    pass


def register(architecture: str, cls: type) -> None:
    _REGISTRY[architecture] = cls


def supported_architectures() -> list[str]:
    return sorted(_REGISTRY)


def model_class(architecture: str) -> type:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} is not supported; supported: {', '.join(supported_architectures())}"
        ) from None
