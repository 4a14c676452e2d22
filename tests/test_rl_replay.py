"""Routing replay and the engine's recorded log-probs: what GRPO's ratio rests on.

(a) the forward replaying its own routes is bit-identical to the plain forward; (b) a forced different
route changes the output (replay is real); (c) the engine's recorded routes are the training forward's
routes on the rollout tokens, and its log-probs match the training forward's (float32, <= 1e-4);
(d) with replay the log-probs still match where the free routing differs (balancing biases moved
after the rollout: they steer the choice only, so replayed routes make them irrelevant).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import CONFIG
from zaya_jax import model as zmodel
from zaya_jax.infer import Engine
from zaya_jax.train import grpo, loss, rollout, step

TOL = 1e-4


@pytest.fixture(scope="module")
def params():
    return zmodel.init(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def rolled(params):
    """Two prompts x 3 rollouts from a recording engine, and their training batch (replayed routes)."""
    engine = Engine(params, CONFIG, slots=8, max_len=48, record=True)
    rolls = rollout.sample(engine, [[5, 6, 7, 8, 9], [11, 12, 13]], group=3, max_new_tokens=20, seed=0, step=1,
                           stop_token_ids=[])
    return rolls, rollout.to_batch(rolls, np.ones(6, np.float32), 48)


@jax.jit
def _forward(params, tokens, mask, routes=None):
    logits, _, aux = zmodel.apply(params, CONFIG, tokens, zmodel.uncached_context(mask), routes=routes)
    return logits, aux


def test_replaying_own_routes_is_bit_identical(params):
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones_like(tokens).at[0, :4].set(0)  # a left-padded row too
    logits, aux = _forward(params, tokens, mask)
    replayed, aux2 = _forward(params, tokens, mask, aux["routes"])
    assert aux["routes"].shape == (CONFIG.num_hidden_layers, 2, 16)
    assert np.array_equal(np.asarray(replayed), np.asarray(logits))
    assert np.array_equal(np.asarray(aux2["route_counts"]), np.asarray(aux["route_counts"]))
    # -1 leaves the choice to the router: the same forward again.
    free, _ = _forward(params, tokens, mask, jnp.full_like(aux["routes"], -1))
    assert np.array_equal(np.asarray(free), np.asarray(logits))


def test_forcing_another_route_changes_the_output(params):
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, CONFIG.vocab_size)
    mask = jnp.ones_like(tokens)
    logits, aux = _forward(params, tokens, mask)
    routes = aux["routes"].at[0, 0, 3].set((aux["routes"][0, 0, 3] + 1) % CONFIG.num_experts)
    forced, aux2 = _forward(params, tokens, mask, routes)
    assert np.array_equal(np.asarray(aux2["routes"]), np.asarray(routes))
    diff = np.abs(np.asarray(forced - logits))[0].max(axis=-1)
    assert np.all(diff[:3] == 0)  # causal: earlier tokens untouched
    assert diff[3] > 1e-3  # the forced token's own output moved


def _train_logprobs(params, batch, replay):
    routes = batch["routes"].transpose(2, 0, 1) if replay else None
    logp, routes = _logprobs(params, batch["tokens"], batch["mask"], routes)
    return np.asarray(logp), np.asarray(routes).transpose(1, 2, 0)


@jax.jit
def _logprobs(params, tokens, mask, routes):
    logp, _, aux = loss.next_token_logprobs(params, CONFIG, tokens, mask, routes=routes)
    return logp, aux["routes"]


def test_engine_routes_and_logprobs_match_training(params, rolled):
    rolls, batch = rolled
    w = np.asarray(loss.target_weights(batch["loss_mask"], batch["mask"])) > 0
    assert w.sum() == 6 * 20  # every rollout ran to max_new_tokens (no stop ids)
    logp, routes = _train_logprobs(params, batch, replay=False)
    gap = np.abs(logp - batch["old_logprobs"])[w].max()
    print(f"\nengine vs training log-prob gap (float32, free routing): max {gap:.2e} over {w.sum()} tokens")
    assert gap <= TOL
    fed = batch["routes"] >= 0  # prompt and generated tokens the engine fed (not the last one)
    assert fed.sum() == sum(len(p) + len(t) - 1 for p, t in zip(rolls.prompts, rolls.tokens)) * CONFIG.num_hidden_layers
    assert np.array_equal(routes[fed], batch["routes"][fed])
    replayed, _ = _train_logprobs(params, batch, replay=True)
    assert np.abs(replayed - batch["old_logprobs"])[w].max() <= TOL


def test_recorded_routes_of_a_prompt_past_the_last_whole_chunk(params):
    """A prompt whose bucket is capped at a cache length that is not a multiple of the prefill chunk
    (max_len 40: a 48-token cache = 32 + 16): the last chunk's routes are cut to the cache, and still
    match training's."""
    engine = Engine(params, CONFIG, slots=2, max_len=40, prefill_chunk=32, record=True)
    prompt = [int(t) for t in jax.random.randint(jax.random.key(4), (35,), 1, CONFIG.vocab_size)]
    rolls = rollout.sample(engine, [prompt], group=2, max_new_tokens=4, seed=0, step=1, stop_token_ids=[])
    batch = rollout.to_batch(rolls, np.ones(2, np.float32), 40)
    _, routes = _train_logprobs(params, batch, replay=False)
    fed = batch["routes"] >= 0
    assert fed.sum() == 2 * (35 + 4 - 1) * CONFIG.num_hidden_layers
    assert np.array_equal(routes[fed], batch["routes"][fed])


def test_replay_keeps_the_gap_where_routes_differ(params, rolled):
    _, batch = rolled
    w = np.asarray(loss.target_weights(batch["loss_mask"], batch["mask"])) > 0
    moved = jax.tree.map(lambda x: x, params)
    biases = moved["layers"]["router"]["balancing_biases"]
    moved["layers"]["router"]["balancing_biases"] = biases + jax.random.uniform(jax.random.key(3), biases.shape) * 0.3
    free_logp, free_routes = _train_logprobs(moved, batch, replay=False)
    fed = batch["routes"] >= 0
    differ = (free_routes != batch["routes"]) & fed
    assert differ.mean() > 0.1, "the bias shift should reroute many tokens"
    free_gap = np.abs(free_logp - batch["old_logprobs"])[w].max()
    replayed, _ = _train_logprobs(moved, batch, replay=True)
    gap = np.abs(replayed - batch["old_logprobs"])[w].max()
    print(f"\n{differ.mean():.0%} of routes differ: gap {free_gap:.2e} routing afresh, {gap:.2e} replayed")
    assert free_gap > 10 * TOL
    assert gap <= TOL


def test_first_update_ratio_is_one_with_replay(params, rolled):
    """The objective's own gap metric at the rollout params: what metrics.jsonl reports as logprob_gap."""
    _, batch = rolled
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    _, (count, _, sums) = jax.jit(lambda p, b: grpo.GRPOObjective()(p, CONFIG, b, step.TrainConfig()))(params, batch)
    assert float(count) == 120
    assert float(sums["max_logprob_gap"]) <= TOL
    assert abs(float(sums["ratio"]) / float(count) - 1.0) < TOL


def test_logprobs_match_at_a_sampling_temperature(params):
    """Rollouts at temperature 0.7: the engine records log-probs of softmax(logits / 0.7); the objective
    at that temperature recomputes them (ratio 1), the plain distribution does not."""
    engine = Engine(params, CONFIG, slots=8, max_len=48, record=True)
    rolls = rollout.sample(engine, [[5, 6, 7, 8, 9], [11, 12, 13]], group=3, max_new_tokens=20, seed=0, step=1,
                           temperature=0.7, stop_token_ids=[])
    batch = {k: jnp.asarray(v) for k, v in rollout.to_batch(rolls, np.ones(6, np.float32), 48).items()}

    def gap(objective):
        _, (count, _, sums) = jax.jit(lambda p, b: objective(p, CONFIG, b, step.TrainConfig()))(params, batch)
        return float(sums["max_logprob_gap"]), float(sums["ratio"]) / float(count)

    scaled, ratio = gap(grpo.GRPOObjective(temperature=0.7))
    plain, _ = gap(grpo.GRPOObjective())
    print(f"\nengine vs training log-prob gap at temperature 0.7: {scaled:.2e} (at 1.0: {plain:.2e})")
    assert scaled <= TOL and abs(ratio - 1.0) < TOL
    assert plain > 100 * TOL
