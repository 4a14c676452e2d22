"""The train step: exact gradient accumulation, overfitting a small batch, bias balancing, bfloat16.

Compiling a train step takes most of this file's time, so the tests share a few compiled steps (one per
TrainConfig) and one batch shape.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_ref
import zaya_jax
from zaya_jax.train import balance, step

CONFIG = zaya_jax.ZayaConfig(**hf_ref.TINY)
BASE = step.TrainConfig(learning_rate=1e-2, warmup_steps=5, total_steps=150, weight_decay=0.0)
LENGTHS = [32, 25, 32, 18]


@functools.cache
def compiled(tcfg):
    return step.make_train_step(CONFIG, tcfg)


@functools.cache
def init_params(seed):
    return zaya_jax.init(CONFIG, jax.random.key(seed))


def fresh_state(params, tcfg):
    return step.init_state(jax.tree.map(jnp.copy, params), tcfg)  # the compiled step donates its input


def random_batch(lengths, seq_len, seed):
    """Right-padded random rows; about 80% of real tokens are targets."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(lengths), seq_len), np.int32)
    mask = np.zeros_like(tokens)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, CONFIG.vocab_size, n)
        mask[b, :n] = 1
    loss_mask = mask * (rng.random(mask.shape) > 0.2)
    return {"tokens": jnp.asarray(tokens), "mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}


def run(tcfg, params, batch, steps):
    state, history = fresh_state(params, tcfg), []
    for _ in range(steps):
        state, metrics = compiled(tcfg)(state, batch)
        history.append(jax.device_get(metrics))
    return state, history


def test_gradient_accumulation_is_exact():
    """Two micro-batches of 2 rows give the same steps as one batch of 4 (the loss is the mean over all
    targets of the batch, not a mean of micro-batch means)."""
    batch = random_batch(LENGTHS, 32, seed=5)
    (s1, h1), (s2, h2) = (run(dataclasses.replace(BASE, grad_accum=a), init_params(0), batch, 3) for a in (1, 2))
    for m1, m2 in zip(h1, h2):
        np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
        np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)
        np.testing.assert_array_equal(m1["route_counts"], m2["route_counts"])
    assert h1[0]["target_tokens"] == batch["loss_mask"][:, 1:].sum()
    assert h1[0]["tokens"] == sum(LENGTHS)
    assert h1[0]["lr"] == 0.0 and h1[2]["lr"] > 0.0  # warmup from 0
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not np.allclose(s1.params["embed"], init_params(0)["embed"])


def test_tiny_model_overfits_a_small_batch():
    _, history = run(BASE, init_params(1), random_batch(LENGTHS, 32, seed=6), BASE.total_steps)
    losses = [float(m["loss"]) for m in history]
    print(f"overfit: loss {losses[0]:.3f} -> {losses[-1]:.4f} ({losses[-1] / losses[0]:.2%})")
    assert losses[-1] < 0.05 * losses[0]


def test_bfloat16_compute_keeps_float32_master():
    batch = random_batch(LENGTHS, 32, seed=7)
    tcfg = dataclasses.replace(BASE, compute_dtype="bfloat16", remat_policy="dots")
    state, (metrics,) = run(tcfg, init_params(0), batch, 1)
    _, (ref,) = run(BASE, init_params(0), batch, 1)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))
    assert state.biases.dtype == jnp.float32
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=2e-2)
    assert metrics["loss"] != ref["loss"]  # it really ran in bfloat16


def test_weight_decay_mask():
    mask = step.decay_mask(init_params(0))
    assert mask["embed"] and mask["layers"]["attn"]["o_proj"]["kernel"] and mask["layers"]["experts"]["gate_up"]
    assert mask["layers"]["attn"]["cca"]["conv_depthwise"] and mask["layers"]["router"]["down"]["kernel"]
    assert not mask["layers"]["input_norm"]["scale"] and not mask["layers"]["router"]["down"]["bias"]
    assert not mask["layers"]["attn"]["temp"] and not mask["input_scale"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["post_mlp_scale"]["residual_bias"] and not mask["layers"]["router"]["state_scale"]


def test_biases_balance_a_skewed_router(tmp_path):
    """A router skewed onto expert 0 ends within 2x of uniform load; the skip bias is untouched and the
    optimizer never moves anything else (learning rate 0: only the biases change)."""
    hf_ref.build("tiny", tmp_path, seed=2)  # every weight random at its natural scale: a router with spread
    config, params = zaya_jax.load(tmp_path)
    router = params["layers"]["router"]
    # Skew: the router MLP's first hidden unit grows for every token, and it feeds expert 0's logit.
    skewed = {**router, "fc2": {**router["fc2"], "bias": router["fc2"]["bias"].at[:, 0].add(2.0)},
              "out": {"kernel": router["out"]["kernel"].at[:, 0, 0].add(1.0)}}
    params = {**params, "layers": {**params["layers"], "router": skewed}}

    @jax.jit
    def load(biases, tokens):  # expert load on a held-out batch, 1 = uniform
        p = balance.merge_biases(balance.split_biases(params)[0], biases)
        ctx = zaya_jax.model.uncached_context(jnp.ones_like(tokens))
        counts = zaya_jax.apply(p, config, tokens, ctx, return_hidden=True)[2]["route_counts"]
        return balance.load_metrics(counts)["expert_load"] * config.num_experts

    held_out = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (16, 64)), jnp.int32)
    before = np.asarray(load(router["balancing_biases"], held_out))
    tcfg = step.TrainConfig(learning_rate=0.0, warmup_steps=0, total_steps=400, bias_rate=3e-3)
    train_step = step.make_train_step(config, tcfg)
    state = fresh_state(params, tcfg)
    for i in range(tcfg.total_steps):
        state, metrics = train_step(state, random_batch([32] * 8, 32, seed=100 + i))
    after = np.asarray(load(state.biases, held_out))
    print(f"expert load / uniform per layer:\n{before}\n-> {after}")
    assert (before.max(axis=1) > 3).all(), "the router was not skewed"
    assert (after <= 2).all() and (after >= 0.5).all()
    np.testing.assert_array_equal(state.biases[:, -1], router["balancing_biases"][:, -1])
    for a, b in zip(jax.tree.leaves(balance.split_biases(params)[0]), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_bad_batches_and_settings_are_refused_before_the_step():
    """What the compiled step would train on wrongly without a word (clamped ids, doubled targets, rows past
    the context) is refused by name before it runs; so are settings Adam or the loop cannot use."""
    train = compiled(BASE)
    good = random_batch(LENGTHS, 32, seed=5)
    V, context = CONFIG.vocab_size, CONFIG.max_position_embeddings
    long = np.ones((1, context + 1), np.int32)
    for change, message in [
        ({"tokens": good["tokens"].at[1, 3].set(V)}, rf"input_ids\[1, 3\] = {V} outside the vocabulary"),
        ({"tokens": good["tokens"].at[0, 0].set(-1)}, r"input_ids\[0, 0\] = -1 outside"),
        ({"loss_mask": good["loss_mask"].at[2, 1].set(2)}, r"loss_mask\[2, 1\] = 2 is not 0 or 1"),
        ({"mask": good["mask"] * 2}, r"attention_mask\[0, 0\] = 2 is not 0 or 1"),
        ({"tokens": long, "mask": long, "loss_mask": long}, f"{context + 1} tokens per row, more than"),
    ]:
        with pytest.raises(zaya_jax.InputError, match=message):
            train(None, {**good, **change})  # refused before the state is looked at
    with pytest.raises(zaya_jax.InputError, match="4 rows does not split into grad_accum=3"):
        step.make_train_step(CONFIG, dataclasses.replace(BASE, grad_accum=3))(None, good)
    for change, message in [(dict(grad_accum=1.5), "grad_accum=1.5: must be integers"),
                            (dict(total_steps=True), "total_steps=True"), (dict(b1=2.0), "b1 and b2 must be in"),
                            (dict(eps=0.0), "eps > 0"), (dict(moe_impl="bogus"), "moe_impl must be one of")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(BASE, **change)
