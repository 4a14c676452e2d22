"""Structured output: a grammar per request, whose allowed next tokens are a per-row bitmask computed on
the host before each step and applied inside the compiled step (``sampling.mask_tokens``).

The grammars are llguidance's (JSON schemas, and ``{"type": "object"}`` for OpenAI's JSON mode): it
computes a request's next-token mask lazily from its parser state, with no per-grammar precomputation
over the vocabulary, straight into a ``[rows, ceil(V / 32)]`` int32 bitmask — the layout the compiled
step takes. A schema it cannot compile is refused when the request is made (``GrammarError``).

JSON is generated compact (no free whitespace between tokens), so the only unbounded parts of a value are
those its schema leaves unbounded (strings, numbers, arrays, nested objects); a generation cut by
``max_tokens`` may be invalid JSON (finish reason "length"), as with OpenAI.

The vocabulary comes from the model's ``tokenizer.json``: llguidance reads byte-level BPE and
SentencePiece-style (byte-fallback) tokenizers itself; a tokenizer whose decoder only joins tokens
(``Fuse``, the demo model's character vocabulary) is given to it as each token's own text.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from typing import Mapping, Sequence

import llguidance
import llguidance.numpy
import numpy as np
import tokenizers

# Compact JSON: no whitespace a random-ish model could repeat forever between tokens.
JSON_OPTIONS = {"whitespace_flexible": False}
_executor: llguidance.LLExecutor | None = None
_executor_lock = threading.Lock()


class GrammarError(ValueError):
    """A response format or schema that cannot be compiled; the message says why."""


def mask_width(vocab_size: int) -> int:
    """int32 words of a token mask row: ceil(V / 32)."""
    return (vocab_size + 31) // 32


@dataclasses.dataclass(frozen=True)
class Grammar:
    """A compiled grammar: ``matcher()`` gives a fresh parser for each request that follows it; it allows
    ``eos_ids`` once complete, over a vocabulary of ``vocab_size`` tokens."""

    name: str
    vocab_size: int
    eos_ids: tuple[int, ...]
    _prototype: llguidance.LLMatcher

    def matcher(self) -> llguidance.LLMatcher:
        return self._prototype.deep_copy()


class GrammarVocabulary:
    """The model's vocabulary as llguidance sees it (each token's bytes), built once per tokenizer (about a
    second for a 262k vocabulary); ``eos_ids`` are the tokens a grammar allows once it is complete.

    tokenizer: the ``tokenizers.Tokenizer`` of the model; vocab_size: the model's (may exceed the
    tokenizer's: the ids past it are never allowed).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        if not eos_ids:
            raise GrammarError("a grammar needs an end-of-sequence token to end on; the model has none")
        self.vocab_size, self.eos_ids = int(vocab_size), tuple(int(t) for t in eos_ids)
        self._tokenizer = _lltokenizer(tokenizer, self.vocab_size, list(self.eos_ids))

    def compile(self, response_format: Mapping | None) -> Grammar | None:
        """The grammar of an OpenAI ``response_format``: None for ``{"type": "text"}`` (or None);
        ``{"type": "json_object"}`` any JSON object; ``{"type": "json_schema", "json_schema": {"name": ...,
        "schema": {...}}}`` JSON valid against the schema. GrammarError naming the problem otherwise."""
        name, schema = _schema_of(response_format)
        if schema is None:
            return None
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as e:
            raise GrammarError(f"cannot compile the schema {name!r}: {e}") from None
        error = llguidance.LLMatcher.validate_grammar(text, self._tokenizer)
        if error:
            raise GrammarError(f"cannot compile the schema {name!r}: {error}")
        matcher = llguidance.LLMatcher(self._tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"cannot compile the schema {name!r}: {matcher.get_error()}")
        return Grammar(name=name, vocab_size=self.vocab_size, eos_ids=self.eos_ids, _prototype=matcher)


def fill_masks(rows: Sequence[tuple[llguidance.LLMatcher, int]], masks: np.ndarray) -> None:
    """Writes the next-token mask of each (matcher, row) into ``masks[row]`` ([n, ceil(V / 32)] int32, C
    order), computing them in parallel."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = llguidance.LLExecutor()
    llguidance.numpy.fill_next_token_bitmask_par(_executor, list(rows), masks)


def _schema_of(response_format: Mapping | None) -> tuple[str, dict | None]:
    """(name, JSON schema) of a response format; (name, None) for plain text."""
    if response_format is None:
        return "text", None
    if not isinstance(response_format, Mapping):
        raise GrammarError(f"response_format must be an object, got {type(response_format).__name__}")
    kind = response_format.get("type")
    if kind == "text":
        return "text", None
    if kind == "json_object":
        return "json_object", {"type": "object"}
    if kind != "json_schema":
        raise GrammarError(f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, Mapping):
        raise GrammarError("response_format of type 'json_schema' needs a `json_schema` object "
                           '({"name": ..., "schema": {...}})')
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise GrammarError("response_format.json_schema needs a `name` (a non-empty string)")
    schema = spec.get("schema")
    if not isinstance(schema, (Mapping, bool)):
        raise GrammarError(f"response_format.json_schema {name!r} needs a `schema` (a JSON schema object)")
    return name, schema


def _lltokenizer(tokenizer: tokenizers.Tokenizer, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    copy = tokenizers.Tokenizer.from_str(tokenizer.to_str())
    copy.no_padding()
    copy.no_truncation()
    try:
        return llguidance.LLTokenizer(copy.to_str(), n_vocab=vocab_size, eos_token=eos_ids)
    except ValueError as e:
        decoder = json.loads(copy.to_str()).get("decoder") or {}
        if decoder.get("type") != "Fuse":
            raise GrammarError(f"the grammar library cannot read this tokenizer: {e}") from None
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_JoinedTokens(copy, eos_ids)), n_vocab=vocab_size,
                                  eos_token=eos_ids)


class _JoinedTokens:
    """A tokenizer whose decoder joins tokens as they are (``Fuse``), in llguidance's ``TokenizerWrapper``
    terms: each token's bytes are its own text; added special tokens are marked special."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, eos_ids: list[int]):
        self._tokenizer = tokenizer
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokens = [(tokenizer.id_to_token(i) or "").encode("utf-8") for i in range(n)]
        self.special_token_ids = sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)
        self.eos_token_id, self.bos_token_id = eos_ids[0], None

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids
