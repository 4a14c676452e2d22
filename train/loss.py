"""Masked next-token cross-entropy computed in token chunks, so at most ``chunk x V`` logits exist.

Conventions (those of transformers' ``ForCausalLMLoss``): the hidden state at position ``t`` predicts
token ``t + 1``; ``loss_mask[b, t]`` says whether token ``t`` is a target. The loss is the mean over
targets; ``masked_ce_sum`` returns the sum and the count so gradient accumulation can divide once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya_jax import model as zmodel
from zaya_jax import moe
from zaya_jax.config import ZayaConfig

# Logits materialised per chunk: about 64 Mi float32 values (256 MiB), whatever the vocabulary.
CHUNK_LOGITS = 1 << 26


def default_chunk(num_tokens: int, vocab_size: int) -> int:
    """Tokens per loss chunk: ``CHUNK_LOGITS // V``, at least 1, at most ``num_tokens``."""
    return max(1, min(num_tokens, CHUNK_LOGITS // vocab_size))


def chunked_ce_sum(hidden, head, targets, weights, chunk: int):
    """Sum of ``weights * CE(hidden @ head, targets)`` over tokens, ``chunk`` tokens at a time.

    hidden: [N, D]; head: [D, V]; targets: [N] int32; weights: [N] float32. Logits are float32 and
    rematerialised per chunk in the backward pass, so memory is ``chunk x V`` rather than ``N x V``.
    """
    n, d = hidden.shape
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    xs = (hidden.reshape(-1, chunk, d), targets.reshape(-1, chunk), weights.reshape(-1, chunk))

    @jax.checkpoint
    def one_chunk(total, x):
        h, t, w = x
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)  # [chunk, V]
        target_logit = jnp.take_along_axis(logits, t[:, None], axis=-1)[:, 0]
        return total + jnp.sum((jax.nn.logsumexp(logits, axis=-1) - target_logit) * w), None

    total, _ = jax.lax.scan(one_chunk, jnp.zeros((), jnp.float32), xs)
    return total


def masked_ce_sum(params, config: ZayaConfig, batch: dict, *, chunk: int | None = None, moe_impl: str = "auto",
                  remat_policy: str = "none"):
    """Summed next-token CE over targets of one batch, and what the train step needs beside it.

    batch: ``tokens`` [B, S] int32, ``mask`` [B, S] (1 = real token, right or left padding),
    ``loss_mask`` [B, S] (1 = token is a target). Returns (sum, (count [] float32, route_counts [L, E+1])).
    """
    tokens, mask = batch["tokens"], batch["mask"]
    B, S = tokens.shape
    ctx = zmodel.uncached_context(mask)
    # "auto" resolves for a differentiated call: the fastest forward-only dispatch is slow to train.
    moe_impl = moe.resolve_impl(moe_impl, B * S, training=True)
    hidden, _, aux = zmodel.apply(params, config, tokens, ctx, moe_impl=moe_impl, remat_policy=remat_policy,
                                  return_hidden=True)
    # Position t predicts token t + 1; the last position predicts nothing.
    weights = (batch["loss_mask"][:, 1:] * mask[:, 1:]).astype(jnp.float32)
    weights = jnp.pad(weights, ((0, 0), (0, 1)))
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    head = zmodel.head_kernel(params, config).astype(hidden.dtype)
    n = B * S
    total = chunked_ce_sum(hidden.reshape(n, -1), head, targets.reshape(n), weights.reshape(n),
                           chunk or default_chunk(n, config.vocab_size))
    return total, (jnp.sum(weights), aux["route_counts"])
