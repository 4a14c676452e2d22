"""Batched generation: validation, shape bucketing, and the two compiled programs.

``generate`` left-pads the prompts into one batch, runs a compiled prefill (which also samples the
first token) and a compiled decode loop (``lax.while_loop``), and reports every row's stop reason.
Batch, prompt and output lengths are rounded up to powers of two, so a session of varied requests
compiles a handful of programs; sampling knobs, per-row limits and stop tokens are arrays, so
changing them never recompiles. The decode state (cache included) is donated to the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.cache import init_cache
from zaya_jax.config import ZayaConfig
from zaya_jax.model import INFERENCE_COMPILER_OPTIONS, compute_dtype
from zaya_jax.sharding import to_host

from . import engine
from .sampling import SamplingParams, pad_rows, per_row, row_keys

MIN_PROMPT_BUCKET = 16
MIN_OUTPUT_BUCKET = 16
MIN_STOP_BUCKET = 4


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens per prompt (stop token included when one ended the row) and why each row stopped:
    "stop_token", "max_new_tokens" or "cache_full"."""

    tokens: list[list[int]]
    stop_reasons: list[str]


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), minimum, 1)
    return 1 << (m - 1).bit_length()


def validate_prompts(prompts, config: ZayaConfig, max_len: int) -> list[list[int]]:
    """Prompts as lists of ints; raises ValueError naming the prompt and the problem."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise ValueError("prompts must be a sequence of token-id sequences (use a tokenizer for text)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    out = []
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(f"prompt {i} must be a flat sequence of integer token ids")
        if ids.size == 0:
            raise ValueError(f"prompt {i} is empty: a prompt needs at least one token")
        bad = ids[(ids < 0) | (ids >= config.vocab_size)]
        if bad.size:
            raise ValueError(f"prompt {i} has token id(s) {sorted(set(bad.tolist()))[:8]} outside the vocabulary "
                             f"[0, {config.vocab_size})")
        if ids.size >= max_len:
            raise ValueError(f"prompt {i} has {ids.size} tokens; the maximum length (prompt + new tokens) is "
                             f"{max_len}, which leaves no room to generate")
        out.append(ids.tolist())
    return out


def stop_id_array(config: ZayaConfig, stop_token_ids=None) -> np.ndarray:
    """Stop ids ``[K]`` int32 padded with -1 to a power of two; None means the config's EOS ids."""
    stops = list(config.eos_token_id) if stop_token_ids is None else [int(t) for t in stop_token_ids]
    out = np.full((bucket(len(stops), MIN_STOP_BUCKET),), -1, np.int32)
    out[: len(stops)] = stops
    return out


def generate(params, config: ZayaConfig, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             min_p=0.0, stop_token_ids=None, seed: int = 0, max_cache_len: int | None = None,
             moe_impl: str = "auto", stream: Callable[[list[list[int]]], None] | None = None,
             stream_interval: int = 8) -> GenerationResult:
    """Generates continuations of ``prompts`` (token-id lists of any lengths) in one batch.

    ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` are scalars or one value per
    prompt. Temperature 0 is greedy. ``stop_token_ids`` defaults to the config's EOS ids (``[]``: none).
    Row ``b`` samples step ``s`` with ``fold_in(fold_in(key(seed), b), s)``. A row whose prompt plus
    output outgrows ``max_cache_len`` (default: no limit beyond ``config.max_position_embeddings``)
    stops with "cache_full". ``stream``, when given, is called with each row's newly emitted tokens
    every ``stream_interval`` steps.
    """
    max_len = config.max_position_embeddings if max_cache_len is None else min(max_cache_len, config.max_position_embeddings)
    prompts = validate_prompts(prompts, config, max_len)
    n = len(prompts)
    max_new = per_row("max_new_tokens", max_new_tokens, n, np.int32)
    if (max_new < 1).any():
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new.tolist()}")
    sampling = SamplingParams.create(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)

    B = bucket(n)
    S = bucket(max(len(p) for p in prompts), MIN_PROMPT_BUCKET)
    N = bucket(int(max_new.max()), MIN_OUTPUT_BUCKET)
    T = S + N

    tokens = np.zeros((B, S), np.int32)
    starts = np.full((B,), S, np.int32)  # padding rows hold no real token
    for b, p in enumerate(prompts):
        tokens[b, S - len(p):] = p
        starts[b] = S - len(p)
    row_limit = np.zeros((B,), np.int32)
    row_limit[:n] = max_new

    state = prefill_and_start(
        params, config, jnp.asarray(tokens), jnp.asarray(starts), max_len, pad_rows(sampling, B),
        row_keys(seed, B), jnp.asarray(row_limit), jnp.asarray(stop_id_array(config, stop_token_ids)), cache_len=T, buffer_len=N,
        moe_impl=moe_impl)
    if stream is None:
        state = decode_compiled(params, config, state, N, moe_impl=moe_impl)
    else:
        shown = np.zeros((n,), np.int64)
        while True:
            num_new = to_host(state.num_new)[:n]
            rows = to_host(state.tokens)[:n]
            stream([rows[b, shown[b]:num_new[b]].tolist() for b in range(n)])
            shown = num_new
            if not (to_host(state.reason)[:n] == engine.RUNNING).any() or int(state.step) >= N:
                break
            state = decode_compiled(params, config, state, int(state.step) + stream_interval, moe_impl=moe_impl)

    num_new, rows, reasons = (to_host(a)[:n] for a in (state.num_new, state.tokens, state.reason))
    return GenerationResult(
        tokens=[rows[b, : num_new[b]].tolist() for b in range(n)],
        stop_reasons=[engine.STOP_REASONS[r] for r in reasons],
    )


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "buffer_len", "moe_impl"),
                   compiler_options=INFERENCE_COMPILER_OPTIONS)
def prefill_and_start(params, config, tokens, starts, max_len, sampling, keys, max_new, stop_ids, *,
                      cache_len, buffer_len, moe_impl):
    """Compiled prefill of a left-padded batch, then the first sampled token: a fresh ``DecodeState``.

    tokens: [B, S] int32 left-padded; starts: [B] first real slot per row; sampling, keys, max_new,
    stop_ids: per-row arrays as ``engine.start`` takes them; ``cache_len`` = S + ``buffer_len`` slots.
    """
    cache = init_cache(config, tokens.shape[0], cache_len, compute_dtype(params)).replace(starts=starts)
    logits, cache = engine.prefill(params, config, tokens, cache, moe_impl=moe_impl)
    return engine.start(logits, cache, sampling, keys, max_new, stop_ids, max_len, buffer_len)


# decode_compiled(params, config, state, until, *, moe_impl): engine.decode compiled, the state donated.
# INFERENCE_COMPILER_OPTIONS: keeps XLA:CPU from hoisting float32 copies of the bf16 weights out of the
# layer scan and the decode loop (a float32 copy of the whole model otherwise; see zaya_jax.model).
decode_compiled = jax.jit(engine.decode, static_argnames=("config", "moe_impl"), donate_argnames=("state",),
                          compiler_options=INFERENCE_COMPILER_OPTIONS)
