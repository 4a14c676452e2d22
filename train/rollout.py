"""RL rollouts: G samples per prompt from a recording engine, and the training batch they make.

The engine records, for every request, the route each token took in each layer and the log-prob of
each sampled token (``Engine(record=True)``): the batch carries both, so the training forward can
replay the rollout's routing and take its ratio against the policy that actually sampled. A rollout's
key is a function of (seed, step, index) alone, so a step's rollouts never depend on slots, batch
company or what ran before (``--resume`` repeats them exactly).

Shapes: B rollouts (each prompt's G in a row), S tokens (prompt + response, right-padded), L layers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.infer.engine import Engine
from zaya_jax.infer.sampling import seed_key


@dataclasses.dataclass
class Rollouts:
    """B rollouts: ``prompts[b]`` (each prompt ``group`` times in a row), generated ``tokens[b]`` (stop token
    included), ``stop_reasons[b]``, ``logprobs[b]`` [n] and ``routes[b]`` [P + n, L] (see ``Request``)."""

    prompts: list[tuple[int, ...]]
    tokens: list[list[int]]
    stop_reasons: list[str]
    logprobs: list[np.ndarray]
    routes: list[np.ndarray]
    seconds: float

    @property
    def generated(self) -> int:
        return sum(len(t) for t in self.tokens)


def rollout_keys(seed: int, step: int, count: int) -> np.ndarray:
    """Key data ``[count, 2]``: rollout i of RL step ``step`` draws with ``fold_in(fold_in(key(seed), step), i)``."""
    base = jax.random.fold_in(seed_key(seed), step)
    return np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(count))))


def sample(engine: Engine, prompts: Sequence[Sequence[int]], *, group: int, max_new_tokens: int, seed: int,
           step: int, temperature: float = 1.0, stop_token_ids=None) -> Rollouts:
    """``group`` samples of each prompt on ``engine`` (which must record), keyed by (seed, step, index)."""
    if not engine.record:
        raise ValueError("rollouts need an Engine(record=True): the routes and log-probs are the training inputs")
    start = time.perf_counter()
    keys = rollout_keys(seed, step, len(prompts) * group)
    requests = [engine.submit(p, max_new_tokens=max_new_tokens, temperature=temperature, key=keys[i * group + g],
                              stop_token_ids=stop_token_ids)
                for i, p in enumerate(prompts) for g in range(group)]
    while not all(r.done for r in requests):
        engine.step()
    return Rollouts(prompts=[r.prompt for r in requests], tokens=[r.tokens for r in requests],
                    stop_reasons=[r.stop_reason for r in requests], logprobs=[r.logprobs for r in requests],
                    routes=[r.routes for r in requests], seconds=time.perf_counter() - start)


def to_batch(rollouts: Rollouts, advantages, seq_len: int, *, replay: bool = True) -> dict[str, np.ndarray]:
    """The ``grpo.GRPOObjective`` batch of ``rollouts`` (numpy), right-padded to ``seq_len`` tokens.

    tokens, mask, loss_mask (1 on generated tokens) [B, S]; advantages [B]; old_logprobs [B, S] (column
    t: the engine's log-prob of token t + 1); with ``replay``, routes [B, S, L] (-1 where nothing was
    recorded: padding and the never-fed last token, which the router then chooses itself).
    """
    B, L = len(rollouts.tokens), rollouts.routes[0].shape[1]
    tokens = np.zeros((B, seq_len), np.int32)
    mask, loss_mask = np.zeros((B, seq_len), np.int32), np.zeros((B, seq_len), np.int32)
    old = np.zeros((B, seq_len), np.float32)
    routes = np.full((B, seq_len, L), -1, np.int32)
    for b, (prompt, gen) in enumerate(zip(rollouts.prompts, rollouts.tokens)):
        P, n = len(prompt), len(prompt) + len(gen)
        if n > seq_len:
            raise ValueError(f"rollout {b} has {n} tokens, more than the batch's {seq_len}")
        tokens[b, :n] = list(prompt) + list(gen)
        mask[b, :n], loss_mask[b, P:n] = 1, 1
        old[b, P - 1:n - 1] = rollouts.logprobs[b]
        routes[b, :n] = rollouts.routes[b]
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "old_logprobs": old,
             "advantages": np.asarray(advantages, np.float32)}
    if replay:
        batch["routes"] = routes
    return batch
