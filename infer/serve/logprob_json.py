"""OpenAI's ``logprobs`` objects of a choice, from the engine's ``TokenLogprob``s.

Completions: ``{"tokens": [str], "token_logprobs": [float | None], "top_logprobs": [{str: float} | None],
"text_offset": [int]}``; each ``top_logprobs`` entry holds the k most likely tokens and the chosen one (up
to k + 1 entries, as OpenAI documents); an echoed prompt's first token has None for both (nothing precedes
it). ``text_offset`` is where each token's string starts in the concatenation of the choice's token strings.
Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}``
with k entries in each ``top_logprobs``. A token's string is its own decoding (special tokens spelled
out); its ``bytes`` are that string's UTF-8.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..logprobs import TokenLogprob


class CompletionLogprobs:
    """A completion choice's ``logprobs`` object, piece by piece (each streamed chunk carries its own piece;
    ``text_offset`` runs on across pieces)."""

    def __init__(self, token_text: Callable[[int], str]):
        self.token_text, self.offset = token_text, 0

    def piece(self, items: Sequence[tuple[int, TokenLogprob | None]]) -> dict:
        """The object for ``(token, log-probs)`` pairs (None: an echoed prompt's first token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, entry in items:
            text = self.token_text(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            top = None
            if entry is not None:
                top = {self.token_text(t): logprob for t, logprob in entry.top}
                top.setdefault(text, entry.logprob)
            out["token_logprobs"].append(None if entry is None else entry.logprob)
            out["top_logprobs"].append(top)
        return out


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """A chat choice's (or chunk's) ``logprobs`` object."""
    def token(t: int, logprob: float) -> dict:
        text = token_text(t)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**token(e.token, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top]}
                        for e in entries]}
