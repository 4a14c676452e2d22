"""Masked next-token cross-entropy computed in token chunks, so at most ``chunk x V`` logits exist.

Conventions (those of transformers' ``ForCausalLMLoss``): the hidden state at position ``t`` predicts
token ``t + 1``; ``loss_mask[b, t]`` says whether token ``t`` is a target. The loss is the mean over
targets; ``masked_ce_sum`` returns the sum and the count so gradient accumulation can divide once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from zaya_jax import backend, moe
from zaya_jax import model as zmodel
from zaya_jax.config import ZayaConfig

# Logits materialised per chunk: about 64 Mi float32 values (256 MiB), whatever the vocabulary.
CHUNK_LOGITS = 1 << 26


def default_chunk(num_tokens: int, vocab_size: int) -> int:
    """Tokens per loss chunk: ``CHUNK_LOGITS // V``, at least 1, at most ``num_tokens``."""
    return max(1, min(num_tokens, CHUNK_LOGITS // vocab_size))


def chunked_token_logprobs(hidden, head, targets, chunk: int):
    """Per-token ``log softmax(hidden @ head)[targets]`` and the distribution's entropy, ``chunk`` tokens at
    a time.

    hidden: [N, D]; head: [D, V]; targets: [N] int32. Returns (logprobs [N], entropy [N]) float32; the
    entropy is a metric (no gradient). Logits are float32 and rematerialised per chunk in the backward
    pass, so memory is ``chunk x V`` rather than ``N x V``.
    """
    n, d = hidden.shape
    pad = (-n) % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, pad), (0, 0)))
        targets = jnp.pad(targets, (0, pad))

    @jax.checkpoint
    def one_chunk(_, x):
        h, t = x
        logits = jnp.dot(h, head, preferred_element_type=jnp.float32)  # [chunk, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return None, (jnp.take_along_axis(logp, t[:, None], axis=-1)[:, 0], jax.lax.stop_gradient(entropy))

    _, (logprobs, entropy) = jax.lax.scan(one_chunk, None, (hidden.reshape(-1, chunk, d), targets.reshape(-1, chunk)),
                                         unroll=backend.scan_unroll("loss_chunks"))
    return logprobs.reshape(-1)[:n], entropy.reshape(-1)[:n]


def next_token_logprobs(params, config: ZayaConfig, tokens, mask, *, routes=None, chunk: int | None = None,
                        moe_impl: str = "auto", remat_policy: str = "none", temperature: float = 1.0):
    """Log-probability of each next token: ``logprobs[b, t] = log p(tokens[b, t + 1] | tokens[b, :t + 1])``.

    tokens, mask: [B, S] (mask 1 = real token, right or left padding); routes: [L, B, S] int32 to replay
    (see ``zaya_jax.model.apply``); ``temperature``: the distribution is ``softmax(logits / temperature)``,
    the one a sampler at that temperature draws from (and the engine records). Returns (logprobs [B, S],
    entropy [B, S] of each next-token distribution (no gradient), aux of the forward); the last column,
    which predicts nothing, is 0.
    """
    B, S = tokens.shape
    ctx = zmodel.uncached_context(mask)
    # "auto" resolves for a differentiated call: the fastest forward-only dispatch is slow to train.
    moe_impl = moe.resolve_impl(moe_impl, B * S, training=True)
    hidden, _, aux = zmodel.apply(params, config, tokens, ctx, moe_impl=moe_impl, remat_policy=remat_policy,
                                  return_hidden=True, routes=routes, stack_experts=False)
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    head = zmodel.head_kernel(params, config).astype(hidden.dtype)
    if temperature != 1.0:
        hidden = hidden / jnp.asarray(temperature, hidden.dtype)  # (h / T) @ head = logits / T
    n = B * S
    logprobs, entropy = chunked_token_logprobs(hidden.reshape(n, -1), head, targets.reshape(n),
                                               chunk or default_chunk(n, config.vocab_size))
    last = jnp.arange(S) < S - 1
    return jnp.where(last, logprobs.reshape(B, S), 0.0), jnp.where(last, entropy.reshape(B, S), 0.0), aux


def masked_ce_sum(params, config: ZayaConfig, batch: dict, *, chunk: int | None = None, moe_impl: str = "auto",
                  remat_policy: str = "none"):
    """Summed next-token CE over targets of one batch, and what the train step needs beside it.

    batch: ``tokens`` [B, S] int32, ``mask`` [B, S] (1 = real token, right or left padding),
    ``loss_mask`` [B, S] (1 = token is a target). Returns (sum, (count [] float32, route_counts [L, E+1])).
    """
    mask = batch["mask"]
    logprobs, _, aux = next_token_logprobs(params, config, batch["tokens"], mask, chunk=chunk, moe_impl=moe_impl,
                                           remat_policy=remat_policy)
    weights = target_weights(batch["loss_mask"], mask)
    return -jnp.sum(logprobs * weights), (jnp.sum(weights), aux["route_counts"])


def target_weights(loss_mask, mask):
    """[B, S] float32: 1 where column t's next token (t + 1) is a real target; the last column predicts
    nothing."""
    w = (loss_mask[:, 1:] * mask[:, 1:]).astype(jnp.float32)
    return jnp.pad(w, ((0, 0), (0, 1)))
