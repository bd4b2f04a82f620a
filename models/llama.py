"""The Llama family: Llama 2/3/3.1/3.2, Mistral (full attention), Qwen2/2.5, SmolLM.

They differ only in config: GQA ratio, RoPE scaling, QKV biases, tied embeddings.
The call is pure: token ids, the KV cache and the attention metadata go in; hidden
states and the updated cache come out. `logits()` projects the rows the runner picked.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.layers import MLP, Attention, RMSNorm, param

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: K and V pages, each (KV, N, S, D)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, bias=cfg.mlp_bias)

    def __call__(self, x, k_pages, v_pages, meta, inv_freq, backend, mesh):
        with jax.named_scope("attention"):
            h, k_pages, v_pages = self.attn(self.input_norm(x), k_pages, v_pages, meta, inv_freq, backend, mesh)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + self.mlp(self.post_attn_norm(x))
        return x, k_pages, v_pages


@functools.partial(jax.jit, static_argnums=(0, 7, 8))
def _run_layer(graphdef, state, x, k_pages, v_pages, meta, inv_freq, backend, mesh):
    """One decoder layer as a nested jit: the layers share one graphdef and their inputs' shapes,
    so a step traces and lowers the layer once, not once per layer (XLA still inlines every
    call and fuses as before). This keeps warm-up time from growing with the depth in Python."""
    return nnx.merge(graphdef, state)(x, k_pages, v_pages, meta, inv_freq, backend, mesh)


class LlamaForCausalLM(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), dtype, std=1.0)
        self.layers = nnx.List([DecoderLayer(cfg, dtype, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = (
            None if cfg.tie_word_embeddings
            else param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), dtype)
        )
        self.inv_freq = nnx.Variable(jnp.asarray(cfg.rope_inv_freq()))  # a constant, not a Param
        self.attention_backend = "reference"
        self.mesh = None  # the device mesh being served on: attention then runs per shard (models.sharded_attention)

    def __call__(
        self, tokens: Int[Array, " T"], kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[Float[Array, "T E"], KVCache]:
        x = self.embed[...][tokens]
        new_cache = []
        for layer, (k_pages, v_pages) in zip(self.layers, kv_cache, strict=True):
            graphdef, state = nnx.split(layer)
            x, k_pages, v_pages = _run_layer(graphdef, state, x, k_pages, v_pages, meta, self.inv_freq[...],
                                             self.attention_backend, self.mesh)
            new_cache.append((k_pages, v_pages))
        return self.norm(x), new_cache

    def logits(self, hidden: Float[Array, "B E"]) -> Float[Array, "B V"]:
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, w, preferred_element_type=jnp.float32)

    # ---- checkpoint names ----------------------------------------------------------

    @staticmethod
    def hf_param_map(cfg: ModelConfig) -> dict[str, tuple[tuple, Callable]]:
        """HF tensor name -> (our param path, transform from HF's layout to ours).

        Transforms use array methods only, so they run on numpy and jax arrays alike (the
        loader runs them on the device); the transform of a parameter depends on its kind
        (q, k, gate, ...) alone, never on its layer."""
        h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size

        def heads_in(n):  # torch Linear (n*d, e) -> (e, n, d)
            return lambda w: w.T.reshape(e, n, d)

        def heads_bias(n):
            return lambda b: b.reshape(n, d)

        def o_proj(w):  # (e, h*d) -> (h, d, e)
            return w.T.reshape(h, d, e)

        def t(w):
            return w.T

        def same(w):
            return w

        m = {
            "model.embed_tokens.weight": (("embed",), same),
            "model.norm.weight": (("norm", "weight"), same),
        }
        if not cfg.tie_word_embeddings:
            m["lm_head.weight"] = (("lm_head",), t)
        for i in range(cfg.num_layers):
            p, L = f"model.layers.{i}.", ("layers", i)
            m |= {
                p + "input_layernorm.weight": (L + ("input_norm", "weight"), same),
                p + "post_attention_layernorm.weight": (L + ("post_attn_norm", "weight"), same),
                p + "self_attn.q_proj.weight": (L + ("attn", "q"), heads_in(h)),
                p + "self_attn.k_proj.weight": (L + ("attn", "k"), heads_in(k)),
                p + "self_attn.v_proj.weight": (L + ("attn", "v"), heads_in(k)),
                p + "self_attn.o_proj.weight": (L + ("attn", "o"), o_proj),
                p + "mlp.gate_proj.weight": (L + ("mlp", "gate"), t),
                p + "mlp.up_proj.weight": (L + ("mlp", "up"), t),
                p + "mlp.down_proj.weight": (L + ("mlp", "down"), t),
            }
            if cfg.qkv_bias:
                m |= {
                    p + "self_attn.q_proj.bias": (L + ("attn", "q_bias"), heads_bias(h)),
                    p + "self_attn.k_proj.bias": (L + ("attn", "k_bias"), heads_bias(k)),
                    p + "self_attn.v_proj.bias": (L + ("attn", "v_bias"), heads_bias(k)),
                }
            if cfg.o_bias:
                m[p + "self_attn.o_proj.bias"] = (L + ("attn", "o_bias"), same)
            if cfg.mlp_bias:
                m |= {
                    p + "mlp.gate_proj.bias": (L + ("mlp", "gate_bias"), same),
                    p + "mlp.up_proj.bias": (L + ("mlp", "up_bias"), same),
                    p + "mlp.down_proj.bias": (L + ("mlp", "down_bias"), same),
                }
        return m
