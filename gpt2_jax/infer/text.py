"""Generated tokens to text for one completion, piece by piece: whole UTF-8 characters only, cut at the first stop string."""

from __future__ import annotations

import codecs

from gpt2_jax.interop.tokenizer import EOT_ID, get_tokenizer


class TextStream:
    """Feed it tokens as they come (`push`), then `finish`; the pieces it returns concatenate to
    the completion's text. A token may end inside a UTF-8 character (GPT-2's tokens are bytes),
    so bytes wait for the rest of their character; text that could be the start of a stop string
    waits until it is known not to be one. <|endoftext|> adds no text."""

    def __init__(self, stops: list[str] = ()):
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1  # longest possible partial stop
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._enc = get_tokenizer()
        self.text, self._sent = "", 0
        self.stopped = False

    def push(self, tokens: list[int]) -> tuple[str, int]:
        """(new text that is safe to hand out, how many of `tokens` it used: fewer than all when
        a stop string ends inside them, after which the stream takes no more)."""
        for used, token in enumerate(tokens, 1):
            if token != EOT_ID and not self._add(self._utf8.decode(self._enc.decode_single_token_bytes(token))):
                return self._take(len(self.text)), used
        return self._take(len(self.text) - self._partial_stop()), len(tokens)

    def finish(self) -> str:
        """The rest of the text (a dangling partial character becomes U+FFFD)."""
        if not self.stopped:
            self._add(self._utf8.decode(b"", final=True))
        return self._take(len(self.text))

    def _add(self, piece: str) -> bool:
        """Append `piece`; False if that completed a stop string (the text is cut before it)."""
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
        return not self.stopped

    def _partial_stop(self) -> int:
        """Length of the longest tail of the unsent text that begins some stop string."""
        tail = self.text[self._sent :]
        for n in range(min(self._hold, len(tail)), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stops):
                return n
        return 0

    def _take(self, end: int) -> str:
        piece, self._sent = self.text[self._sent : end], max(self._sent, end)
        return piece
