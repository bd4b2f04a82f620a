"""Tokenizer loading and chat templates.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust one, fast for encode and decode) with
what serving needs next to it: the special token ids, the set of ids that end generation,
and the model's chat template rendered the way HF transformers renders it.

Where a tokenizer comes from (`Tokenizer.from_path`):

* an HF folder: `tokenizer.json`, or a SentencePiece `tokenizer.model` when there is no
  `tokenizer.json`; special tokens and the chat template from `tokenizer_config.json`
  (or `chat_template.jinja`, `special_tokens_map.json`), extra end-of-sequence ids from
  `generation_config.json`;
* a `.gguf` file: llama.cpp stores the vocabulary, merges and token types as metadata,
  and we rebuild the tokenizer from them (byte-level BPE for `tokenizer.ggml.model ==
  "gpt2"`, SentencePiece BPE for `"llama"`);
* a SentencePiece model file (e.g. Mistral's `tokenizer.model.v1`), BPE type only.

Chat templates are untrusted Jinja code from model repositories, so they run in jinja2's
immutable sandbox, with the same options and helpers as HF (`trim_blocks`, `lstrip_blocks`,
`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import functools
import json
import mmap
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer


class ChatTemplateError(ValueError):
    """The conversation could not be turned into a prompt: no template, or the template failed."""


class Tokenizer:
    """Text <-> token ids for one model, plus its special tokens and chat template."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        pad_token: str | None = None,
        unk_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
        chat_templates: dict[str, str] | None = None,
    ):
        self._backend = backend
        # Token strings, as chat templates see them (`{{ bos_token }}`).
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.bos_token_id = self._id_of(bos_token)
        self.eos_token_id = self._id_of(eos_token)
        self.pad_token_id = self._id_of(pad_token)
        # Any of these ends a generation: the tokenizer's EOS plus e.g. Llama 3's <|eot_id|>.
        eos_ids = {i for i in extra_eos_token_ids if 0 <= i < self.vocab_size}
        if self.eos_token_id is not None:
            eos_ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos_ids)
        # Named templates, as tokenizer_config.json may hold several; "default" is the one used.
        self._chat_templates = dict(chat_templates or {})

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @classmethod
    def from_path(cls, path: str | Path) -> Tokenizer:
        """Load from an HF folder, a `.gguf` file or a SentencePiece model file."""
        path = Path(path)
        if path.is_dir():
            return _load_hf_folder(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {path}: expected an HF folder, a .gguf file or a SentencePiece model"
            )
        with path.open("rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _load_gguf(path)
        if path.name == "tokenizer.json":
            return _load_hf_folder(path.parent)
        return _load_sentencepiece(path)

    # ---- text <-> ids -------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included (HF's `len(tokenizer)`)."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`, e.g. to save it as `tokenizer.json`."""
        return self._backend

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; `add_special_tokens` adds what the tokenizer adds around a sequence (e.g. BOS)."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Incomplete UTF-8 at the end comes out as U+FFFD, as in HF."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """The vocabulary strings of `ids` (byte-level BPE spells a space as 'Ġ')."""
        return [self._backend.id_to_token(i) for i in ids]

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids that `decode(..., skip_special_tokens=True)` leaves out."""
        return frozenset(i for i, t in self._backend.get_added_tokens_decoder().items() if t.special)

    @functools.cached_property
    def byte_fallback_ids(self) -> frozenset[int]:
        """Ids of byte pieces ('<0xE4>') that the decoder joins into characters, if it does.

        The joining is all or nothing: a run of byte pieces that is not valid UTF-8 decodes
        to one U+FFFD per piece, so a later byte can spoil characters an earlier decode
        showed. The detokenizer needs to know which ids these are.
        """
        decoder = self._backend.decoder
        if decoder is None or b'"ByteFallback"' not in decoder.__getstate__():
            return frozenset()
        ids = (self._backend.token_to_id(f"<0x{b:02X}>") for b in range(256))
        return frozenset(i for i in ids if i is not None)

    # ---- chat templates -----------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        return self._chat_templates.get("default")

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **extra: Any,
    ) -> str | list[int]:
        """Render `messages` with the model's chat template, as HF's `apply_chat_template` does.

        `extra` becomes template variables (e.g. `tools=[...]`, `documents=[...]`). With
        `tokenize=True` the rendered prompt is encoded without adding special tokens again:
        the template already wrote them.
        """
        template = self._chat_templates.get("default")
        if extra.get("tools") and "tool_use" in self._chat_templates:
            template = self._chat_templates["tool_use"]
        if template is None:
            raise ChatTemplateError(
                "this tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja or "
                "the GGUF metadata); send a plain prompt instead of chat messages"
            )
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("every message must be a dict with at least a 'role'")
        # As HF: a key set to None (OpenAI's content=None) is dropped, since templates
        # test for missing keys and would otherwise print "None".
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        variables = {
            name: token
            for name, token in (
                ("bos_token", self.bos_token),
                ("eos_token", self.eos_token),
                ("unk_token", self.unk_token),
                ("pad_token", self.pad_token),
            )
            if token is not None
        }
        variables.update(tools=None, documents=None)
        variables.update(extra)
        try:
            prompt = _compile_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template failed: {e}") from e
        except Exception as e:  # a template is foreign code: e.g. `str + list` raises TypeError
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
        if tokenize:
            return self.encode(prompt, add_special_tokens=False)
        return prompt


# ---- chat template rendering ------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}...{% endgeneration %}` marks assistant text for training masks.

    Rendering a prompt only needs the body, but without the tag the template would not parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson HTML-escapes '<', '>' and '&', which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.cache
def _template_environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationTag]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    try:
        return _template_environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {e.lineno}): {e.message}") from e


# ---- HF folders ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _named_templates(value: Any) -> dict[str, str]:
    """`chat_template` is a string, or a list of {"name", "template"} (HF's named templates)."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return {}


def _load_hf_folder(folder: Path) -> Tokenizer:
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    if (folder / "tokenizer.json").is_file():
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        specials: dict[str, str | None] = {}
    elif (folder / "tokenizer.model").is_file():
        backend, specials = _sentencepiece_from_model_file(
            folder / "tokenizer.model",
            add_bos=config.get("add_bos_token", True),
            add_eos=config.get("add_eos_token", False),
        )
    else:
        raise FileNotFoundError(
            f"{folder} has neither tokenizer.json nor tokenizer.model (for a GGUF model, pass the .gguf file itself)"
        )

    def special(name: str) -> str | None:
        return _token_content(config.get(name)) or _token_content(special_map.get(name)) or specials.get(name)

    templates = _named_templates(config.get("chat_template"))
    if (folder / "chat_template.jinja").is_file():  # newer transformers save it beside the config
        templates["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")

    # generation_config.json may name several ids that end a turn (Llama 3: [128001, 128008, 128009]),
    # and may be the only place that names EOS at all.
    gen_eos = generation.get("eos_token_id")
    gen_eos_ids = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos = special("eos_token")
    if (eos is None or backend.token_to_id(eos) is None) and gen_eos_ids:
        eos = backend.id_to_token(gen_eos_ids[0])
    return Tokenizer(
        backend,
        bos_token=special("bos_token"),
        eos_token=eos,
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        extra_eos_token_ids=gen_eos_ids,
        chat_templates=templates,
    )


# ---- GGUF -----------------------------------------------------------------------------------

# llama.cpp token types (tokenizer.ggml.token_type), shared with SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6  # 5 marks unused pieces

# How text is cut into words before BPE, per `tokenizer.ggml.pre` (llama.cpp's name for the
# pre-tokenizer a vocabulary was trained with): (split regex or None for GPT-2's, isolate
# every numeral first, ignore_merges). A wrong choice silently changes token ids, so an
# unknown name is an error rather than a guess.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BYTE_LEVEL_PRE: dict[str, tuple[str | None, bool, bool]] = {
    "default": (None, False, False),
    "gpt-2": (None, False, False),
    # SmolLM and StarCoder: every \p{N} character on its own, then GPT-2's regex.
    "smollm": (None, True, False),
    "starcoder": (None, True, False),
    "llama-bpe": (_LLAMA3_SPLIT, False, True),
    "llama3": (_LLAMA3_SPLIT, False, True),
    "qwen2": (_QWEN2_SPLIT, False, False),
}


def _byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """(pre-tokenizer, ignore_merges) for a byte-level BPE vocabulary trained with `pre`."""
    if pre not in _BYTE_LEVEL_PRE:
        raise ValueError(
            f"GGUF pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(_BYTE_LEVEL_PRE))}); "
            "load the model's HF tokenizer.json folder instead"
        )
    split, isolate_numerals, ignore_merges = _BYTE_LEVEL_PRE[pre]
    steps: list[pre_tokenizers.PreTokenizer] = []
    if isolate_numerals:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is not None:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    else:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    return (steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)), ignore_merges


@functools.cache
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map, the alphabet byte-level vocabularies are spelled in.

    Printable Latin-1 bytes stand for themselves; the others (controls, space) are moved to
    U+0100 onwards in byte order, which is why a space shows as 'Ġ' (U+0120).
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, moved = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + moved)
            moved += 1
    return table


def _byte_level_bpe(
    tokens: list[str], merges: list[str], token_types: list[int], pre: str, add_bos: str | None, add_eos: str | None
) -> BackendTokenizer:
    """A GPT-2-style byte-level BPE tokenizer from llama.cpp's vocabulary metadata."""
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Tokens are stored in the byte alphabet; one that is not (rare) is respelled from its UTF-8.
    spelled = [t if set(t) <= letters else "".join(alphabet[b] for b in t.encode()) for t in tokens]
    vocab = {t: i for i, t in enumerate(spelled)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    pre_tokenizer, ignore_merges = _byte_level_pre_tokenizer(pre)
    backend = BackendTokenizer(models.BPE(vocab, pairs, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) are matched whole in text and are skipped
    # by decode(skip_special_tokens=True); user-defined ones are matched whole but kept.
    kinds = list(zip(spelled, token_types, strict=True))
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in kinds if k == _CONTROL])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in kinds if k == _USER_DEFINED])
    backend.post_processor = _special_template(backend, add_bos, add_eos)
    return backend


def _special_template(backend: BackendTokenizer, bos: str | None, eos: str | None) -> processors.TemplateProcessing:
    """The post-processor that puts BOS/EOS around encoded text (what `add_special_tokens` adds)."""
    single = " ".join([*([f"{bos}:0"] if bos else []), "$A:0", *([f"{eos}:0"] if eos else [])])
    pair = " ".join([single, *([f"{bos}:1"] if bos else []), "$B:1", *([f"{eos}:1"] if eos else [])])
    used = [t for t in dict.fromkeys((bos, eos)) if t]
    return processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=[(t, backend.token_to_id(t)) for t in used]
    )


# GGUF metadata value types: struct formats of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key/value metadata at the head of a GGUF file (v2 or v3), tensors left unread.

    The `gguf` package's GGUFReader also parses this, but it makes a numpy view per array
    element, which takes seconds for a 49k-token vocabulary; a tokenizer needs none of that.
    Layout: b"GGUF", u32 version, u64 tensor count, u64 kv count, then per kv: string key,
    u32 type, value; a string is u64 length + UTF-8, an array is u32 type + u64 count + items.
    """
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        pos = 0

        def read(fmt: str) -> tuple:
            nonlocal pos
            values = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return values

        def string() -> str:
            nonlocal pos
            (size,) = read("Q")
            pos += size
            return buf[pos - size : pos].decode("utf-8", errors="replace")

        def value(kind: int) -> Any:
            if kind == _GGUF_STRING:
                return string()
            if kind == _GGUF_ARRAY:
                item_kind, count = read("IQ")
                if item_kind in _GGUF_SCALARS:
                    return list(read(f"{count}{_GGUF_SCALARS[item_kind]}"))
                return [value(item_kind) for _ in range(count)]
            return read(_GGUF_SCALARS[kind])[0]

        try:
            magic, version, _, kv_count = read("4sIQQ")
            if magic != b"GGUF" or version < 2:
                raise ValueError(f"GGUF version {version} (only 2 and 3 are read)")
            metadata = {}
            for _ in range(kv_count):
                key = string()
                metadata[key] = value(read("I")[0])
        except (struct.error, KeyError, ValueError) as e:
            raise ValueError(f"{path.name}: not a readable GGUF file ({e}); it may be truncated or corrupt") from e
    return metadata


def _load_gguf(path: Path) -> Tokenizer:
    metadata = _read_gguf_metadata(path)

    def value(key: str, default: Any = None) -> Any:
        return metadata.get(key, default)

    kind = value("tokenizer.ggml.model")
    tokens = value("tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError(f"{path.name} carries no tokenizer (no tokenizer.ggml.tokens)")
    token_types = value("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

    def token(key: str) -> str | None:
        i = value(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    if kind == "gpt2":
        add_bos = bos if value("tokenizer.ggml.add_bos_token", False) else None
        add_eos = eos if value("tokenizer.ggml.add_eos_token", False) else None
        backend = _byte_level_bpe(
            tokens,
            value("tokenizer.ggml.merges", []),
            token_types,
            value("tokenizer.ggml.pre", "default"),
            add_bos,
            add_eos,
        )
    elif kind == "llama":
        # llama.cpp adds BOS to a SentencePiece vocabulary unless the file says otherwise.
        add_bos = bos if value("tokenizer.ggml.add_bos_token", True) else None
        add_eos = eos if value("tokenizer.ggml.add_eos_token", False) else None
        backend = _sentencepiece_bpe(
            tokens,
            value("tokenizer.ggml.scores"),
            token_types,
            add_dummy_prefix=value("tokenizer.ggml.add_space_prefix", True),
            byte_fallback=_BYTE in token_types,
            unk=token("unknown_token_id"),
            add_bos=add_bos,
            add_eos=add_eos,
        )
    else:
        raise ValueError(
            f"{path.name}: GGUF tokenizer type {kind!r} is not supported (only 'gpt2' byte-level BPE and "
            "'llama' SentencePiece BPE); load the model's HF tokenizer.json folder instead"
        )
    # llama.cpp's end-of-turn / end-of-message ids also end a generation (Llama 3's <|eot_id|>).
    extra_eos = [i for key in ("eot_token_id", "eom_token_id") if (i := value(f"tokenizer.ggml.{key}")) is not None]
    template = value("tokenizer.chat_template")
    return Tokenizer(
        backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=token("padding_token_id"),
        unk_token=token("unknown_token_id"),
        extra_eos_token_ids=extra_eos,
        chat_templates={"default": template} if template else None,
    )


# ---- SentencePiece --------------------------------------------------------------------------


def _sentencepiece_bpe(
    pieces: list[str],
    scores: list[float],
    piece_types: list[int],
    *,
    add_dummy_prefix: bool,
    byte_fallback: bool,
    unk: str | None,
    add_bos: str | None,
    add_eos: str | None,
) -> BackendTokenizer:
    """A SentencePiece BPE model (Llama 2, Mistral) as a `tokenizers` BPE.

    SentencePiece merges the adjacent pair whose joined piece scores highest. A ranked
    merge list reproduces that: every way to cut a piece into two vocabulary pieces is a
    merge, ranked by the joined piece's score. Spaces are spelled '▁', and a space is put
    before the text (add_dummy_prefix), which decode strips again.
    """
    vocab = {p: i for i, p in enumerate(pieces)}
    mergeable = {_NORMAL, _USER_DEFINED}
    ranked = []
    for piece, score, kind in zip(pieces, scores, piece_types, strict=True):
        if kind not in mergeable or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                # Equal scores (rare): the lower id first, then the shorter left part.
                ranked.append((-score, vocab[piece], cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    backend = BackendTokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=byte_fallback))
    # As SentencePiece: '▁' before the text, then every space as '▁'. (A Metaspace
    # pre-tokenizer would skip the extra '▁' when the text starts with a space, and
    # SentencePiece does not.) The text between special tokens gets its own '▁', as when
    # each piece of a prompt is encoded by SentencePiece separately.
    steps = [normalizers.Replace(" ", "▁")]
    if add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    kinds = list(zip(pieces, piece_types, strict=True))
    backend.add_special_tokens(
        [AddedToken(p, special=True, normalized=False) for p, k in kinds if k in (_CONTROL, _UNKNOWN)]
    )
    backend.add_tokens([AddedToken(p, special=False, normalized=False) for p, k in kinds if k == _USER_DEFINED])
    backend.post_processor = _special_template(backend, add_bos, add_eos)
    return backend


def _protobuf_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of a protobuf message: ints for varints, bytes for everything else."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, varint()
        elif wire in (1, 5):  # fixed64, fixed32
            size = 8 if wire == 1 else 4
            yield number, buf[pos : pos + size]
            pos += size
        elif wire == 2:
            size = varint()
            yield number, buf[pos : pos + size]
            pos += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")


@dataclass(frozen=True)
class _SentencePieceModel:
    """What we use of a SentencePiece `ModelProto` (the .model file)."""

    pieces: list[str]
    scores: list[float]
    types: list[int]  # _NORMAL, _CONTROL, _BYTE, ...
    bpe: bool  # model type BPE (the other types, e.g. unigram, are not supported)
    byte_fallback: bool
    add_dummy_prefix: bool
    plain_text: bool  # identity normalization and no whitespace folding, as Llama/Mistral
    unk: str | None
    bos: str | None
    eos: str | None


def _read_sentencepiece_model(path: Path) -> _SentencePieceModel:
    """Parse a SentencePiece model file; field numbers from sentencepiece_model.proto.

    ModelProto{1: pieces, 2: trainer_spec, 3: normalizer_spec}; SentencePiece{1: piece,
    2: score, 3: type}; TrainerSpec{3: model_type (2 is BPE), 35: byte_fallback, 40-42:
    unk/bos/eos ids}; NormalizerSpec{1: name, 3: add_dummy_prefix, 4: remove_extra_whitespaces}.
    """
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[int, int | bytes] = {}
    normalizer: dict[int, int | bytes] = {}
    try:
        for number, value in _protobuf_fields(path.read_bytes()):
            if number == 1:
                fields = dict(_protobuf_fields(value))
                pieces.append(fields[1].decode())
                scores.append(struct.unpack("<f", fields[2])[0] if 2 in fields else 0.0)
                types.append(fields.get(3, _NORMAL))
            elif number == 2:
                trainer = dict(_protobuf_fields(value))
            elif number == 3:
                normalizer = dict(_protobuf_fields(value))
    except (IndexError, KeyError, ValueError, AttributeError, struct.error) as e:
        raise ValueError(f"{path.name}: not a SentencePiece model file ({type(e).__name__}: {e})") from e

    def piece(field: int, default: int) -> str | None:
        i = trainer.get(field, default)  # -1 (disabled) arrives as a huge unsigned varint
        return pieces[i] if isinstance(i, int) and 0 <= i < len(pieces) else None

    return _SentencePieceModel(
        pieces=pieces,
        scores=scores,
        types=types,
        bpe=trainer.get(3, 1) == 2,
        byte_fallback=bool(trainer.get(35, 0)),
        add_dummy_prefix=bool(normalizer.get(3, 1)),
        plain_text=normalizer.get(1, b"identity") == b"identity" and not normalizer.get(4, 1),
        unk=piece(40, 0),
        bos=piece(41, 1),
        eos=piece(42, 2),
    )


def _sentencepiece_from_model_file(
    path: Path, add_bos: bool = True, add_eos: bool = False
) -> tuple[BackendTokenizer, dict[str, str | None]]:
    """The tokenizer of a SentencePiece model file, and its bos/eos/unk token strings."""
    model = _read_sentencepiece_model(path)
    if not model.bpe:
        raise ValueError(f"{path.name}: only SentencePiece BPE models are supported (this one is unigram or other)")
    if not model.plain_text:
        # Replaying SentencePiece's normalization rules is not implemented; tokenizer.json carries them.
        raise ValueError(
            f"{path.name}: SentencePiece text normalization is not supported; use the model's HF tokenizer.json"
        )
    backend = _sentencepiece_bpe(
        model.pieces,
        model.scores,
        model.types,
        add_dummy_prefix=model.add_dummy_prefix,
        byte_fallback=model.byte_fallback,
        unk=model.unk,
        add_bos=model.bos if add_bos else None,
        add_eos=model.eos if add_eos else None,
    )
    return backend, {"bos_token": model.bos, "eos_token": model.eos, "unk_token": model.unk}


def _load_sentencepiece(path: Path) -> Tokenizer:
    backend, specials = _sentencepiece_from_model_file(path)
    return Tokenizer(backend, **specials)
