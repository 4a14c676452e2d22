"""Presence and frequency penalties and logit bias, as OpenAI defines them, applied inside the compiled steps.

For each row, with ``c[j]`` the number of times token ``j`` occurs among the tokens the request has
generated so far (the prompt not counted):

    logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty
    logits[j] += logit_bias[j]

before temperature, the top-k / top-p / min-p filters and greedy choice (``sampling.sample``). The knobs
are per-row arrays like the other sampling knobs, so requests differ without recompiling.

Memory: ``counts`` is dense, ``[slots, vocab]`` int32 — 268 MB for 256 slots of a 262,144-token
vocabulary (ZAYA1-8B), 67 MB for 64 slots; split over the pool's data axes like every slot field. Dense,
because a step then costs one scattered increment per row to keep the counts, and one elementwise pass
over ``[slots, vocab]`` (fused with the logits it rewrites, and skipped while no row has a penalty) to
apply them; a sparse history of each row's tokens would need a ``[slots, tokens]`` scatter into the
logits every step. int32 keeps the formula exact at any length (an int16 count saturates at 32,767).
The bias is sparse: ``[slots, K]`` ids and values, ``K = max_logit_bias`` (300, OpenAI's limit), scattered
into the logits (skipped while no row has one).

Shapes: M slots (or rows), V vocabulary, K bias entries per row.
"""

from __future__ import annotations

from typing import Mapping

import flax.struct
import jax
import jax.numpy as jnp

from zaya_jax.validate import is_finite_number, is_integer

Array = jax.Array
MAX_LOGIT_BIAS = 300  # OpenAI's limit on logit_bias entries; the engine's default bias width
PENALTY_LIMIT = 2.0  # presence and frequency penalties are in [-2, 2] (OpenAI)
BIAS_LIMIT = 100.0  # a bias is in [-100, 100] (OpenAI): -100 bans a token, +100 all but forces it


@flax.struct.dataclass
class Penalties:
    """Per-row penalty knobs (the counts they act on are kept beside them: ``SlotState.counts``).

    presence:  [M] float32    presence_penalty
    frequency: [M] float32    frequency_penalty
    bias_ids:  [M, K] int32   logit_bias token ids, padded with -1
    bias:      [M, K] float32 their biases (0 in padding)
    """

    presence: Array
    frequency: Array
    bias_ids: Array
    bias: Array

    @classmethod
    def neutral(cls, rows: int, width: int) -> "Penalties":
        """No penalty and no bias for ``rows`` rows."""
        return cls(presence=jnp.zeros((rows,), jnp.float32), frequency=jnp.zeros((rows,), jnp.float32),
                   bias_ids=jnp.full((rows, width), -1, jnp.int32), bias=jnp.zeros((rows, width), jnp.float32))


def apply(logits: Array, p: Penalties, counts: Array | None) -> Array:
    """``logits`` [M, V] with the penalties and biases of ``p`` applied (float32); ``counts`` [M, V] int32:
    the times each row's request has generated each token (None: none yet, so only the bias acts). Each
    part is skipped while no row uses it, so rows without penalties keep their logits bit for bit."""
    logits = logits.astype(jnp.float32)

    def penalise(x):
        c = counts
        return x - (c * p.frequency[:, None] + (c > 0) * p.presence[:, None]).astype(jnp.float32)

    def add_bias(x):
        ids = jnp.where(p.bias_ids >= 0, p.bias_ids, x.shape[1])  # padding: out of range, dropped
        return x.at[jnp.arange(x.shape[0])[:, None], ids].add(p.bias, mode="drop")

    if counts is not None:
        logits = jax.lax.cond(jnp.any((p.presence != 0) | (p.frequency != 0)), penalise, lambda x: x, logits)
    return jax.lax.cond(jnp.any(p.bias_ids >= 0), add_bias, lambda x: x, logits)


def count(counts: Array, rows: Array, token: Array, emitted: Array) -> Array:
    """``counts`` [M, V] with ``token[i]`` counted in row ``rows[i]`` where ``emitted[i]`` (``[I]`` each; rows
    >= M are dropped)."""
    return counts.at[rows, jnp.where(emitted, token, counts.shape[1])].add(1, mode="drop")


def check_penalty(name: str, value) -> float:
    """A presence or frequency penalty as a float in [-2, 2]; ValueError naming it otherwise."""
    if not is_finite_number(value) or abs(value) > PENALTY_LIMIT:
        raise ValueError(f"{name} must be a number in [-{PENALTY_LIMIT:g}, {PENALTY_LIMIT:g}], got {value!r}")
    return float(value)


def check_logit_bias(bias: Mapping | None, vocab: int, width: int) -> tuple[tuple[int, float], ...]:
    """``bias`` ({token id: bias}) as sorted (id, bias) pairs: ids in the vocabulary, biases in [-100, 100],
    at most ``width`` entries; ValueError naming the problem."""
    if bias is None:
        return ()
    if not isinstance(bias, Mapping):
        raise ValueError(f"logit_bias must be a mapping of token id to bias, got {type(bias).__name__}")
    if len(bias) > width:
        raise ValueError(f"logit_bias has {len(bias)} entries; at most {width}")
    out = {}
    for token, value in bias.items():
        if not is_integer(token) or not 0 <= token < vocab:
            raise ValueError(f"logit_bias token {token!r} is not a token id in the vocabulary [0, {vocab})")
        if not is_finite_number(value) or abs(value) > BIAS_LIMIT:
            raise ValueError(f"logit_bias of token {token} must be a number in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}], "
                             f"got {value!r}")
        if int(token) in out:
            raise ValueError(f"logit_bias gives token {int(token)} twice")
        out[int(token)] = float(value)
    return tuple(sorted(out.items()))
