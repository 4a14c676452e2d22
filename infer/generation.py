"""``generate``: batched generation of a list of prompts, on an ``Engine`` sized for the call.

The engine's slots are the prompts (up to ``GENERATE_SLOTS``; more prompts stream through them) and
its ``max_len`` the longest prompt plus the most new tokens asked for, rounded up to a power of two
and capped by the context: memory follows what the model can use, never a large ``max_new_tokens``.
Sampling knobs, limits, seeds and stop ids are arrays in the compiled programs, so changing them
never recompiles; shapes are powers of two, so a process making varied calls compiles a handful.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from zaya_jax.config import ZayaConfig
from zaya_jax.validate import is_integer

from .engine import MIN_PROMPT_BUCKET, Engine, GenerationResult, bucket, check_prompt_list

GENERATE_SLOTS = 64


def generate(params, config: ZayaConfig, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0,
             min_p=0.0, stop_token_ids=None, seed: int = 0, max_cache_len: int | None = None,
             moe_impl: str = "auto", stream: Callable[[list[list[int]]], None] | None = None,
             stream_interval: int = 8) -> GenerationResult:
    """Generates continuations of ``prompts`` (token-id lists of any lengths).

    ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``min_p`` are scalars or one value per
    prompt. Temperature 0 is greedy. ``stop_token_ids`` defaults to the config's EOS ids (``[]``: none).
    Row ``b`` samples step ``s`` with ``fold_in(fold_in(key(seed), b), s)``. A row whose prompt plus
    output reaches ``max_cache_len`` (default and cap: ``config.max_position_embeddings``) stops with
    "cache_full". ``stream``, when given, is called with each row's newly emitted tokens every
    ``stream_interval`` decode steps.
    """
    prompts = check_prompt_list(prompts)
    context = config.max_position_embeddings if max_cache_len is None else min(max_cache_len,
                                                                               config.max_position_embeddings)
    # Sizing only (the engine validates): the longest prompt plus the most new tokens asked for.
    longest = max(len(p) if hasattr(p, "__len__") else 1 for p in prompts)
    asked = np.ravel(np.asarray(max_new_tokens, object))  # object: ints past 64 bits stay ints
    most_new = max((int(m) for m in asked if is_integer(m)), default=1)
    engine = Engine(params, config, slots=min(bucket(len(prompts)), GENERATE_SLOTS),
                    max_len=min(context, bucket(longest + max(most_new, 1), MIN_PROMPT_BUCKET)),
                    decode_steps=stream_interval if stream is not None else 16, moe_impl=moe_impl)
    if stream is None:
        return engine.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, min_p=min_p, stop_token_ids=stop_token_ids, seed=seed)
    fresh: list[list[int]] = [[] for _ in prompts]
    requests = engine.submit_batch(prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                   top_p=top_p, min_p=min_p, stop_token_ids=stop_token_ids, seed=seed,
                                   on_update=lambda r, new: fresh[row[r]].extend(new))
    row = {r: i for i, r in enumerate(requests)}
    while engine.busy:
        engine.step()
        stream([list(f) for f in fresh])
        for f in fresh:
            f.clear()
    return GenerationResult(tokens=[r.tokens for r in requests], stop_reasons=[r.stop_reason for r in requests])
