"""The decode engine: prefill, one decode step, and a decode loop in one ``lax.while_loop``.

Pure functions over pytrees, jit-friendly, with no host logic: ``generate`` (and Markov RSA) compose
them. Rows are left-padded (see ``zaya_jax.cache``): all rows write the same cache slot at each step.

Flow: ``prefill`` fills the cache and gives the last position's logits; ``start`` samples and emits
the first token; ``decode`` then feeds the last emitted token, samples the next and emits it, until
every row has stopped, the output buffer is full, or ``until`` steps are done (for streaming).

Shapes: B rows, S prompt slots, T cache slots, V vocabulary, N output buffer length.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from zaya_jax.cache import KVCache
from zaya_jax.config import ZayaConfig
from zaya_jax.model import apply, cached_context, head_kernel

from .sampling import SamplingParams, sample, step_keys

Array = jax.Array

# Stop reasons, as stored in DecodeState.reason.
RUNNING, STOP_TOKEN, MAX_NEW_TOKENS, CACHE_FULL = 0, 1, 2, 3
STOP_REASONS = ("running", "stop_token", "max_new_tokens", "cache_full")


@flax.struct.dataclass
class DecodeState:
    """Everything the decode loop carries.

    cache:    KVCache holding the prompt and every fed token
    token:    [B] int32    last emitted token of each row (fed at the next step)
    tokens:   [B, N] int32 emitted tokens; row b's are tokens[b, :num_new[b]]
    num_new:  [B] int32    tokens emitted per row
    reason:   [B] int32    RUNNING or why the row stopped
    step:     []  int32    decode steps taken (tokens emitted by a row that never stopped)
    keys:     [B] keys     per-row base keys; step s draws with fold_in(keys[b], s)
    sampling: SamplingParams of [B] arrays
    max_new:  [B] int32    per-row limit on emitted tokens
    limit:    [B] int32    slots a row may fill before its last token: min(T, starts + max_len - 1)
    stop_ids: [K] int32    stop tokens, padded with -1
    """

    cache: KVCache
    token: Array
    tokens: Array
    num_new: Array
    reason: Array
    step: Array
    keys: Array
    sampling: SamplingParams
    max_new: Array
    limit: Array
    stop_ids: Array


def prefill(params, config: ZayaConfig, tokens: Array, cache: KVCache, *, moe_impl: str = "auto"):
    """Writes left-padded prompts ``tokens [B, S]`` at ``cache.index`` (``cache.starts`` set).

    Returns (logits of the last slot [B, V] float32, the cache). The LM head runs on the last slot
    only. Works as a chunked continuation too: the cache may already hold tokens.
    """
    ctx = cached_context(cache, tokens.shape[1])
    hidden, cache, _ = apply(params, config, tokens, ctx, cache, moe_impl=moe_impl, return_hidden=True)
    head = head_kernel(params, config).astype(hidden.dtype)
    logits = jnp.einsum("bd,dv->bv", hidden[:, -1], head, preferred_element_type=jnp.float32)
    return logits, cache


def decode_step(params, config: ZayaConfig, cache: KVCache, token: Array, *, moe_impl: str = "auto"):
    """Feeds one token per row (``token [B]``). Returns (next-token logits [B, V] float32, cache)."""
    ctx = cached_context(cache, 1)
    logits, cache, _ = apply(params, config, token[:, None], ctx, cache, moe_impl=moe_impl)
    return logits[:, 0], cache


def start(logits: Array, cache: KVCache, sampling: SamplingParams, keys: Array, max_new: Array,
          stop_ids: Array, max_len, buffer_len: int) -> DecodeState:
    """The state after sampling and emitting the first token from the prefill ``logits [B, V]``.

    A row stops with CACHE_FULL once prompt plus emitted tokens reach ``max_len`` (at most the
    config's ``max_position_embeddings``) or the cache has no slot left for its last token. Rows with ``max_new <= 0`` start
    stopped (reason MAX_NEW_TOKENS) and emit nothing.
    """
    B = logits.shape[0]
    state = DecodeState(
        cache=cache,
        token=jnp.zeros((B,), jnp.int32),
        tokens=jnp.zeros((B, buffer_len), jnp.int32),
        num_new=jnp.zeros((B,), jnp.int32),
        reason=jnp.where(max_new <= 0, MAX_NEW_TOKENS, RUNNING).astype(jnp.int32),
        step=jnp.zeros((), jnp.int32),
        keys=keys,
        sampling=sampling,
        max_new=max_new.astype(jnp.int32),
        limit=jnp.minimum(cache.max_len, cache.starts + max_len - 1).astype(jnp.int32),
        stop_ids=stop_ids.astype(jnp.int32),
    )
    return _emit(state, sample(logits, sampling, step_keys(keys, 0)))


def _emit(state: DecodeState, token: Array) -> DecodeState:
    """Records ``token [B]`` for running rows at ``state.step`` and decides which rows stop."""
    running = state.reason == RUNNING
    tokens = state.tokens.at[:, state.step].set(jnp.where(running, token, 0))
    num_new = state.num_new + running.astype(jnp.int32)
    hit_stop = jnp.any(token[:, None] == state.stop_ids[None, :], axis=-1)
    no_slot = state.cache.index >= state.limit  # the token just emitted could not be fed
    new_reason = jnp.select(
        [hit_stop, num_new >= state.max_new, no_slot], [STOP_TOKEN, MAX_NEW_TOKENS, CACHE_FULL], RUNNING
    )
    return state.replace(
        token=jnp.where(running, token, state.token),
        tokens=tokens,
        num_new=num_new,
        reason=jnp.where(running, new_reason, state.reason).astype(jnp.int32),
        step=state.step + 1,
    )


def decode(params, config: ZayaConfig, state: DecodeState, until: Array | int | None = None, *,
           moe_impl: str = "auto") -> DecodeState:
    """Runs decode steps in one ``lax.while_loop`` until every row stopped, the buffer is full, or
    ``state.step`` reaches ``until`` (a traced int, so chunked streaming reuses one program)."""
    buffer_len = state.tokens.shape[1]
    end = buffer_len if until is None else jnp.minimum(until, buffer_len)

    def cond(s: DecodeState):
        return (s.step < end) & jnp.any(s.reason == RUNNING)

    def body(s: DecodeState):
        logits, cache = decode_step(params, config, s.cache, s.token, moe_impl=moe_impl)
        token = sample(logits, s.sampling, step_keys(s.keys, s.step))
        return _emit(s.replace(cache=cache), token)

    return jax.lax.while_loop(cond, body, state)
