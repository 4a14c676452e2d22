"""Log-probabilities of tokens under the model, for the tokens a request emits and for its prompt.

A log-prob here is the model's own: ``log_softmax(logits)`` in float32 at temperature 1, before penalties,
logit bias, a grammar's mask and the sampling filters (temperature, top-k, top-p, min-p), as OpenAI
documents and vLLM returns by default. So
a token's log-prob is what ``zaya_jax.forward``'s log-softmax gives at its position, whatever knobs
sampled it. The device programs compute, per row, the chosen token's log-prob and the ``TOP_LOGPROBS``
most likely tokens (a static width, so a request's ``k`` never recompiles); the host keeps the first
``k`` of them.

Shapes: B rows, V vocabulary, K = min(TOP_LOGPROBS, V).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.validate import is_integer

Array = jax.Array
TOP_LOGPROBS = 20  # the most alternatives a request may ask for (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-prob and the ``k`` most likely tokens at its position: ``top`` is
    ``((token id, log-prob), ...)``, most likely first (it may or may not hold ``token``)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@flax.struct.dataclass
class Logprobs:
    """Device log-probs of chosen tokens, any leading shape ``[...]``.

    chosen:     [...] float32     log-prob of each chosen token
    top_ids:    [..., K] int32    the K most likely tokens, most likely first
    top_values: [..., K] float32  their log-probs
    """

    chosen: Array
    top_ids: Array
    top_values: Array


def width(vocab_size: int) -> int:
    """K: the alternatives the programs compute per token."""
    return min(TOP_LOGPROBS, vocab_size)


def of_logits(logits: Array, tokens: Array, k: int) -> Logprobs:
    """The log-probs of ``tokens [...]`` under ``logits [..., V]`` and the ``k`` most likely tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    values, ids = jax.lax.top_k(logp, k)
    return Logprobs(chosen=jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0], top_ids=ids.astype(jnp.int32),
                    top_values=values)


def empty(shape: tuple[int, ...], k: int) -> Logprobs:
    """Zeros of ``Logprobs`` with leading ``shape``."""
    return Logprobs(chosen=jnp.zeros(shape, jnp.float32), top_ids=jnp.zeros(shape + (k,), jnp.int32),
                    top_values=jnp.zeros(shape + (k,), jnp.float32))


def of_logits_if(wanted: Array, logits: Array, tokens: Array, k: int) -> Logprobs:
    """``of_logits`` when ``wanted`` (a [] bool), else zeros: rows that ask none skip the softmax and top-k."""
    return jax.lax.cond(wanted, lambda: of_logits(logits, tokens, k), lambda: empty(tokens.shape, k))


def of_hidden(hidden: Array, head: Callable[[Array], Array], tokens: Array, k: int, block: int = 64) -> Logprobs:
    """Log-probs of ``tokens [G, C]`` after final hidden states ``hidden [G, C, D]`` through the LM head
    (``head``: [N, D] -> [N, V] float32 logits), ``block`` positions at a time: [G, block, V] logits live at
    once, not [G, C, V]."""
    G, C, D = hidden.shape
    block = math.gcd(block, C)
    blocks = lambda a: jnp.moveaxis(a.reshape((G, C // block, block) + a.shape[2:]), 1, 0)  # noqa: E731

    def one(args):
        h, t = args
        return of_logits(head(h.reshape(G * block, D)).reshape(G, block, -1), t, k)

    out = jax.lax.map(one, (blocks(hidden), blocks(tokens)))
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1).reshape((G, C) + a.shape[3:]), out)


def entries(tokens, chosen, top_ids, top_values, k: int) -> list[TokenLogprob]:
    """Host ``TokenLogprob``s of ``tokens [n]`` from host arrays (chosen [n], top_ids / top_values [n, K]),
    each with its first ``k`` alternatives."""
    chosen, top_ids, top_values = np.asarray(chosen), np.asarray(top_ids)[:, :k], np.asarray(top_values)[:, :k]
    return [TokenLogprob(int(t), float(chosen[i]), tuple(zip(top_ids[i].tolist(), top_values[i].tolist())))
            for i, t in enumerate(tokens)]


def check_count(name: str, value, vocab_size: int) -> int | None:
    """``value`` (None, or alternatives per token in [0, width(vocab_size)]) validated; ValueError naming ``name``."""
    if value is None:
        return None
    limit = width(vocab_size)
    if not is_integer(value) or not 0 <= value <= limit:
        raise ValueError(f"{name} must be None or an integer in [0, {limit}], got {value!r}")
    return int(value)
