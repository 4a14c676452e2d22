"""One choice's text as its tokens arrive: stop strings and finish reasons, as OpenAI's API gives them."""

from __future__ import annotations

from typing import Callable, Sequence

from ..scheduler import StopReason

# Engine stop reasons -> OpenAI finish_reason (StopReason.finish_reason), by the label requests carry.
FINISH = {r.label: r.finish_reason for r in StopReason if r.finish_reason is not None}


class ChoiceText:
    """Decodes a choice's tokens as they arrive and cuts its text at the first stop string.

    The stop string itself is not returned; a stop token ends the text without being shown. While the
    choice runs, a suffix that could be the start of a stop string is held back, so streamed deltas
    concatenate to exactly the final text. ``finish_reason`` is set once the choice is over (a stop
    string: "stop" — the caller then cancels the engine request); ``tokens_used`` counts the tokens up to
    and including the one that completed the text.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]):
        self.decode, self.stops = decode, list(stops)
        self.tokens: list[int] = []
        self.sent = ""
        self.finish_reason: str | None = None
        self.tokens_used = 0

    def feed(self, new: Sequence[int], stop_reason: str | None) -> str:
        """Adds newly generated tokens (and the engine's stop reason once it has stopped); returns the
        text that may be sent now."""
        if self.finish_reason is not None:
            return ""
        before = len(self.tokens)
        self.tokens += new
        shown = self.tokens[:-1] if stop_reason == "stop_token" else self.tokens
        text = self.decode(shown)
        cut = self._first_stop(text)
        if cut is not None:
            self.finish_reason = "stop"
            self.tokens_used = self._tokens_to_stop(before)
            return self._emit(text[:cut])
        self.tokens_used = len(self.tokens)
        if stop_reason is not None:
            self.finish_reason = FINISH[stop_reason]
            return self._emit(text)
        return self._emit(text[: len(text) - self._held(text)])

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.sent):] if upto.startswith(self.sent) else ""
        self.sent += delta
        return delta

    def _first_stop(self, text: str) -> int | None:
        # Sent text never contains a stop string's start (it is held back), so search only what is new.
        hits = [i for i in (text.find(s, len(self.sent)) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def _tokens_to_stop(self, before: int) -> int:
        for k in range(before + 1, len(self.tokens) + 1):
            if self._first_stop(self.decode(self.tokens[:k])) is not None:
                return k
        return len(self.tokens)

    def _held(self, text: str) -> int:
        """Characters at the end of ``text`` to hold back: an incomplete character (a multi-byte character
        split across tokens decodes as replacement characters), and before it the longest suffix that is a
        proper prefix of a stop string (the incomplete character may be the one that completes it)."""
        whole = text.rstrip("\ufffd")
        for n in range(min(len(whole), max((len(s) for s in self.stops), default=1) - 1), 0, -1):
            if any(s.startswith(whole[-n:]) for s in self.stops):
                return len(text) - len(whole) + n
        return len(text) - len(whole)
