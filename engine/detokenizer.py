"""Incremental detokenization and stop strings: token ids in, final text deltas out.

A streaming client must only ever see text that will not change. Two things make the
text of the latest tokens provisional:

* a character split across tokens: byte-level BPE (and SentencePiece byte fallback)
  may emit the first bytes of a multi-byte character in one token and the rest in the
  next; decoding in between gives U+FFFD;
* stop strings: text that could be the start of a stop string may still turn into one,
  and a stop string (and what follows it) is never shown.

NOTE: how the text is decoded. Decoding each token on its own loses context (SentencePiece
drops a token's leading space at the start of a decode). So each step decodes a short
window of tokens twice and keeps the difference:

    token_ids:  ...  x | a  b  c | d  e
                         ^prefix   ^read     (the window ends at len(token_ids))
    delta = decode(a b c d e) - decode(a b c)

`prefix..read` is the last stretch already turned into text, used as context only.
When the decode ends in U+FFFD (a character still incomplete), or in a run of
SentencePiece byte pieces (the decoder only joins a run once it is complete, see
`_in_byte_run`), nothing moves and the tokens wait for the next call. Windows start where
an earlier decode ended cleanly, so the deltas add up to `tokenizer.decode(token_ids)`,
the text HF's `decode` gives for the whole output. The output is decoded on its own, not
after the prompt: `text` is exactly what the generated ids decode to.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character


class IncrementalDetokenizer:
    """Turns one sequence's generated token ids into text, a final delta at a time.

    After each `add`, `text` holds everything emitted so far and `stop_reason` the stop
    string that ended the text (None until one does). `finish` flushes what was held back.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ):
        self.tokenizer = tokenizer
        # Kept for callers (echo, logging); not decoded: `text` is the output's text alone.
        self.prompt_token_ids = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.stop = [s for s in stop or () if s]  # an empty stop string would match everywhere
        self.include_stop_str_in_output = include_stop_str_in_output

        self.token_ids: list[int] = []  # every output id given to add()
        self.text = ""  # emitted text; only ever grows
        self.stop_reason: str | None = None
        self._prefix_offset = 0  # start of the context window in token_ids
        self._read_offset = 0  # token_ids[:read_offset] are decoded into text (or _held)
        self._held = ""  # decoded text withheld because it may begin a stop string
        self._finished = False

    def add(self, new_token_ids: Iterable[int]) -> str:
        """Take newly generated ids; return the text that became final (often "")."""
        if self.stop_reason is not None or self._finished:
            return ""
        self.token_ids.extend(new_token_ids)
        return self._emit(self._decode_new(final=False), final=False)

    def finish(self) -> str:
        """End of generation: return whatever was held back (a trailing incomplete character
        decodes to U+FFFD, as in a full decode). Nothing comes after a hit stop string."""
        if self.stop_reason is not None or self._finished:
            return ""
        delta = self._emit(self._decode_new(final=True), final=True)
        self._finished = True
        return delta

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens past read_offset, or "" while it may still change."""
        ids = self.token_ids
        if self._read_offset == len(ids) or (not final and self._in_byte_run()):
            return ""
        decode = self.tokenizer.decode
        prefix_text = decode(ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        full_text = decode(ids[self._prefix_offset :], self.skip_special_tokens)
        # Wait when the new tokens add no text yet (a skipped special token, a lone prefix
        # space) or end inside a character. Not moving the window in the first case keeps
        # a text-producing token as context, which SentencePiece's leading space needs.
        if len(full_text) <= len(prefix_text) or (not final and full_text.endswith(_REPLACEMENT)):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(ids)
        return full_text[len(prefix_text) :]

    def _in_byte_run(self) -> bool:
        """Whether the unread ids end in a run of byte-fallback pieces (SentencePiece '<0xE4>').

        The decoder turns a whole run into U+FFFD if it is not valid UTF-8, so even a run
        that decodes cleanly now is only final once a text piece ends it. (Skipped special
        tokens are removed before decoding, so they do not end a run.)
        """
        byte_ids = self.tokenizer.byte_fallback_ids
        if not byte_ids:
            return False
        skipped = self.tokenizer.special_token_ids if self.skip_special_tokens else frozenset()
        for i in reversed(self.token_ids[self._read_offset :]):
            if i not in skipped:
                return i in byte_ids
        return False

    def _emit(self, new_text: str, final: bool) -> str:
        """Apply stop strings to the text not yet emitted; emit what is safe and return it."""
        pending = self._held + new_text
        if not self.stop:
            return self._release(pending, len(pending))
        # Emitted text never holds the start of a stop string (that is what _held is for),
        # so every match starts inside `pending`. Of the matches, the one that ends first is
        # the one a token-by-token stream would have met first; on equal ends, the longer
        # (earlier start), so that no part of either is shown.
        best: tuple[int, int, str] | None = None  # (end, start, stop)
        for s in self.stop:
            start = pending.find(s)
            if start >= 0 and (best is None or (start + len(s), start) < best[:2]):
                best = (start + len(s), start, s)
        if best is not None:
            end, start, s = best
            self.stop_reason = s
            return self._release(pending, end if self.include_stop_str_in_output else start)
        if final:
            return self._release(pending, len(pending))
        return self._release(pending, len(pending) - self._partial_stop_len(pending))

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest end of `text` that is the beginning of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, pending: str, cut: int) -> str:
        """Emit pending[:cut]; keep the rest held unless a stop ended the text."""
        delta = pending[:cut]
        self._held = "" if self.stop_reason is not None else pending[cut:]
        self.text += delta
        return delta
