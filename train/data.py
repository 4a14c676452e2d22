"""Training data: JSONL records -> tokenized examples with loss masks -> shuffled, right-padded batches.

Each JSONL line is one object of one of these forms:

- ``{"text": "..."}`` — plain text, tokenized with the tokenizer's special tokens (e.g. BOS) and the
  model's EOS appended; every token after the first is a target.
- ``{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]}`` —
  a chat rendered with the tokenizer's chat template; only assistant turns are targets.
- ``{"input_ids": [...], "loss_mask": [...]}`` — already tokenized (``loss_mask`` optional, default all 1).

Batches are right-padded to ``seq_len`` (no packing), so the CCA convolution and value shift never see
another document. The order is a function of ``(seed, position)`` only, which makes the data position
the complete data state to checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Iterable

import jinja2
import numpy as np

from zaya_jax.infer.tokenizer import CHAT_ROLES, Tokenizer, TokenizerError
from zaya_jax.jsonl import read_objects
from zaya_jax.validate import is_integer


class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """ids [n] int32; loss_mask [n] int32 (1 = the token is a prediction target)."""

    ids: np.ndarray
    loss_mask: np.ndarray


def file_sha256(path: str) -> str:
    """The hex sha256 of a file's bytes: a run records its data file's, and a resume checks it."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_jsonl(path: str) -> list[tuple[int, dict]]:
    """(line number, record) for each non-blank line of ``path``."""
    return read_objects(path, what="records", error=DataError)


def chat_example(messages: list[dict], tokenizer: Tokenizer) -> Example:
    """Tokens of a rendered chat; targets are the assistant turns (as the template renders them).

    The chat is rendered prefix by prefix: the text between ``render(messages[:i], generation prompt)``
    and ``render(messages[:i + 1])`` is assistant turn ``i``. Pieces are tokenized separately, so the
    prompt part of a turn tokenizes exactly as it would at inference.
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:  # a misspelt "Assistant" would silently not be trained on
            raise DataError(f"message {i} has role {m['role']!r:.40}; roles are {', '.join(CHAT_ROLES)}")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError("chat has no assistant message (nothing to train on)")
    if messages[0]["role"] == "assistant":
        raise DataError("chat starts with an assistant message (no prompt to condition it on)")
    ids, mask, done = [], [], ""

    def add(text: str, target: bool):
        piece = tokenizer.encode(text, add_special_tokens=False)  # the template writes special tokens
        ids.extend(piece)
        mask.extend([int(target)] * len(piece))

    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.render_chat(messages[:i], add_generation_prompt=True)
        turn = tokenizer.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (prompt.startswith(done) and turn.startswith(prompt)):
            raise DataError(f"the chat template does not render message {i} as an extension of the earlier turns; "
                            "cannot locate the assistant span")
        add(prompt[len(done):], False)
        add(turn[len(prompt):], True)
        done = turn
    full = tokenizer.render_chat(messages, add_generation_prompt=False)
    if not full.startswith(done):
        raise DataError("the chat template renders the whole chat differently from its prefixes")
    add(full[len(done):], False)
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def text_example(text: str, tokenizer: Tokenizer, eos: int | None) -> Example:
    ids = tokenizer.encode(text) + ([eos] if eos is not None else [])
    return Example(np.asarray(ids, np.int32), np.ones(len(ids), np.int32))



def ids_example(record: dict, vocab_size: int) -> Example:
    ids = record["input_ids"]
    mask = record.get("loss_mask", [1] * len(ids) if isinstance(ids, list) else None)
    if not (isinstance(ids, list) and all(is_integer(i) for i in ids)):
        raise DataError("'input_ids' must be a list of integers")
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise DataError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
    if not (isinstance(mask, list) and len(mask) == len(ids) and all(is_integer(v) and v in (0, 1) for v in mask)):
        raise DataError("'loss_mask' must be a list of 0/1 as long as 'input_ids'")
    return Example(np.asarray(ids, np.int32), np.asarray(mask, np.int32))


def record_example(record: dict, tokenizer: Tokenizer | None, eos: int | None, vocab_size: int) -> Example:
    """One JSONL record (see the module docstring) -> Example with ids in ``[0, vocab_size)``."""
    kinds = [k for k in ("text", "messages", "input_ids") if k in record]
    if len(kinds) != 1:
        raise DataError(f"a record needs exactly one of 'text', 'messages', 'input_ids'; got keys {sorted(record)}")
    kind = kinds[0]
    if kind == "input_ids":
        return ids_example(record, vocab_size)
    if tokenizer is None:
        raise DataError(f"'{kind}' records need a tokenizer, and the model directory has none "
                        "(give pre-tokenized 'input_ids' records instead)")
    if kind == "text":
        if not isinstance(record["text"], str):
            raise DataError("'text' must be a string")
        example = text_example(record["text"], tokenizer, eos)
    else:
        if not isinstance(record["messages"], list):
            raise DataError("'messages' must be a list")
        example = chat_example(record["messages"], tokenizer)
    if example.ids.size and (example.ids.min() < 0 or example.ids.max() >= vocab_size):
        raise DataError(f"the tokenizer gives token id(s) outside the model's vocabulary [0, {vocab_size})")
    return example


@dataclasses.dataclass
class LoadReport:
    """What ``load_examples`` kept and dropped."""

    examples: int = 0
    truncated: int = 0  # longer than seq_len: cut to seq_len
    dropped: int = 0  # no target left within seq_len


def load_examples(path: str, seq_len: int, vocab_size: int, tokenizer: Tokenizer | None = None,
                  eos: int | None = None) -> tuple[list[Example], LoadReport]:
    """Reads, tokenizes and truncates every record of a JSONL file; errors name the line."""
    if not is_integer(seq_len) or seq_len < 2:
        raise DataError(f"{path}: seq_len must be an integer >= 2 (a token and its target), got {seq_len!r}")
    examples, report = [], LoadReport()
    for number, record in read_jsonl(path):
        try:
            ex = record_example(record, tokenizer, eos, vocab_size)
        except (DataError, TokenizerError, jinja2.TemplateError) as e:
            raise DataError(f"{path}:{number}: {e}") from None
        if ex.ids.size > seq_len:
            report.truncated += 1
            ex = Example(ex.ids[:seq_len], ex.loss_mask[:seq_len])
        if not ex.loss_mask[1:].any():  # the first token is never predicted
            report.dropped += 1
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no record has a target token within seq_len={seq_len}")
    report.examples = len(examples)
    return examples, report


def pad_batch(examples: Iterable[Example], seq_len: int, pad_id: int = 0) -> dict:
    """Right-padded arrays ``tokens``, ``mask``, ``loss_mask``: [B, seq_len] int32."""
    examples = list(examples)
    out = {k: np.zeros((len(examples), seq_len), np.int32) for k in ("tokens", "mask", "loss_mask")}
    out["tokens"][:] = pad_id
    for b, ex in enumerate(examples):
        n = ex.ids.size
        out["tokens"][b, :n] = ex.ids
        out["mask"][b, :n] = 1
        out["loss_mask"][b, :n] = ex.loss_mask
    return out


class Batches:
    """An endless stream of batches over ``examples``: a fresh shuffle each epoch, batches cross epochs.

    The example at stream position ``p`` is ``examples[perm(seed, p // n)[p % n]]``, so ``position`` (the
    next stream position) and ``seed`` are the whole state.
    """

    def __init__(self, examples: list[Example], batch_size: int, seq_len: int, seed: int, pad_id: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples, self.batch_size, self.seq_len, self.seed, self.pad_id = examples, batch_size, seq_len, seed, pad_id
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _example(self, p: int) -> Example:
        epoch, i = divmod(p, len(self.examples))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._perm_epoch = epoch
        return self.examples[self._perm[i]]

    def __next__(self) -> dict:
        batch = pad_batch((self._example(p) for p in range(self.position, self.position + self.batch_size)),
                          self.seq_len, self.pad_id)
        self.position += self.batch_size
        return batch

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed}

    def restore(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"data state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.position = int(state["position"])
