"""The Llama family: Llama 2/3/3.1/3.2, Mistral (full attention), Qwen2/2.5, SmolLM.

They differ only in config: GQA ratio, RoPE scaling, QKV biases, tied embeddings.
The call is pure: token ids, the KV cache and the attention metadata go in; hidden
states and the updated cache come out. `logits()` projects the rows the runner picked.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.attention import AttentionMetadata
from models.config import ModelConfig
from models.hf_tensor import HFTensor
from models.kernels.reference import rope_tables
from models.layers import MLP, Attention, RMSNorm, param

KVCache = list[tuple[jax.Array, jax.Array]]  # per layer: K and V pages, each (KV, N, S, D)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, bias=cfg.mlp_bias)

    def __call__(self, x, k_pages, v_pages, meta, rope, backend, mesh, matmul):
        with jax.named_scope("attention"):
            x, k_pages, v_pages = self.attn(x, self.input_norm, k_pages, v_pages, meta, rope, backend, mesh, matmul)
        with jax.named_scope("mlp"):
            x = self.mlp(x, self.post_attn_norm, matmul, mesh)
        return x, k_pages, v_pages


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9))
def _run_layer(graphdef, state, x, k_pages, v_pages, meta, rope, backend, mesh, matmul):
    """One decoder layer as a nested jit: the layers share one graphdef and their inputs' shapes,
    so a step traces and lowers the layer once, not once per layer (XLA still inlines every
    call and fuses as before). This keeps warm-up time from growing with the depth in Python."""
    return nnx.merge(graphdef, state)(x, k_pages, v_pages, meta, rope, backend, mesh, matmul)


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
        self.matmul_backend = "xla"  # the projections' op (models.projection)
        self.mesh = None  # the device mesh being served on: attention then runs per shard (models.sharded_attention)

    def __call__(
        self, tokens: Int[Array, " T"], kv_cache: KVCache, meta: AttentionMetadata
    ) -> tuple[Float[Array, "T E"], KVCache]:
        x = self.embed[...][tokens]
        rope = rope_tables(meta.positions, self.inv_freq[...])  # one table for every layer
        new_cache = []
        for layer, (k_pages, v_pages) in zip(self.layers, kv_cache, strict=True):
            graphdef, state = nnx.split(layer)
            x, k_pages, v_pages = _run_layer(graphdef, state, x, k_pages, v_pages, meta, rope,
                                             self.attention_backend, self.mesh, self.matmul_backend)
            new_cache.append((k_pages, v_pages))
        return self.norm(x), new_cache

    def logits(self, hidden: Float[Array, "B E"]) -> Float[Array, "B V"]:
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.dot(hidden, w, preferred_element_type=jnp.float32)

    # ---- checkpoint names ----------------------------------------------------------

    @staticmethod
    def hf_param_map(cfg: ModelConfig) -> dict[str, HFTensor]:
        """HF tensor name -> where it goes in our params, and the transform from HF's layout to ours.

        Transforms use array methods only, so they run on numpy and jax arrays alike (the
        loader runs them on the device); the transform of a parameter depends on its kind
        (q, k, gate, ...) alone, never on its layer. q/k/v fill parts of the fused `qkv`
        (along its group axis), gate/up parts of `gate_up`."""
        h, k, d, e = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        g = h // k

        def grouped(n):  # torch Linear (k*n*d, e) -> (e, k, n, d): n heads of each KV group
            return lambda w: w.T.reshape(e, k, n, d)

        def grouped_bias(n):
            return lambda b: b.reshape(k, n, d)

        def o_proj(w):  # (e, h*d) -> (h, d, e)
            return w.T.reshape(h, d, e)

        def t(w):
            return w.T

        def t_part(w):  # (f, e) -> (e, 1, f): one of gate/up
            return w.T[:, None, :]

        def bias_part(b):  # (f,) -> (1, f)
            return b[None, :]

        def same(w):
            return w

        qkv_parts = {"q": slice(0, g), "k": slice(g, g + 1), "v": slice(g + 1, g + 2)}
        m = {
            "model.embed_tokens.weight": HFTensor(("embed",), same),
            "model.norm.weight": HFTensor(("norm", "weight"), same),
        }
        if not cfg.tie_word_embeddings:
            m["lm_head.weight"] = HFTensor(("lm_head",), t)
        for i in range(cfg.num_layers):
            p, L = f"model.layers.{i}.", ("layers", i)
            m |= {
                p + "input_layernorm.weight": HFTensor(L + ("input_norm", "weight"), same),
                p + "post_attention_layernorm.weight": HFTensor(L + ("post_attn_norm", "weight"), same),
                p + "self_attn.o_proj.weight": HFTensor(L + ("attn", "o"), o_proj),
                p + "mlp.gate_proj.weight": HFTensor(L + ("mlp", "gate_up"), t_part, 1, slice(0, 1)),
                p + "mlp.up_proj.weight": HFTensor(L + ("mlp", "gate_up"), t_part, 1, slice(1, 2)),
                p + "mlp.down_proj.weight": HFTensor(L + ("mlp", "down"), t),
            }
            for name, part in qkv_parts.items():
                n = part.stop - part.start
                m[p + f"self_attn.{name}_proj.weight"] = HFTensor(L + ("attn", "qkv"), grouped(n), 2, part)
                if cfg.qkv_bias:
                    m[p + f"self_attn.{name}_proj.bias"] = HFTensor(L + ("attn", "qkv_bias"), grouped_bias(n), 1, part)
            if cfg.o_bias:
                m[p + "self_attn.o_proj.bias"] = HFTensor(L + ("attn", "o_bias"), same)
            if cfg.mlp_bias:
                m |= {
                    p + "mlp.gate_proj.bias": HFTensor(L + ("mlp", "gate_up_bias"), bias_part, 0, slice(0, 1)),
                    p + "mlp.up_proj.bias": HFTensor(L + ("mlp", "gate_up_bias"), bias_part, 0, slice(1, 2)),
                    p + "mlp.down_proj.bias": HFTensor(L + ("mlp", "down_bias"), same),
                }
        return m
