"""causal_attention: a long prompt's queries in blocks that skip the keys causality masks, exact or not used."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zaya_jax
from zaya_jax import model
from zaya_jax.bench_configs import CONFIGS

BLOCK = 8  # ATTENTION_BLOCK for these tests: prompts of 16+ tokens take the blocked path


@pytest.fixture(scope="module")
def tiny():
    config = zaya_jax.ZayaConfig(**CONFIGS["tiny"])
    return config, zaya_jax.init(config, jax.random.key(0))


def _attention_inputs(B, S, T, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.standard_normal((B, S, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(r.standard_normal((B, 2, T, 16)), jnp.float32) for _ in range(2))  # heads first
    return q, k, v


def _with_block(monkeypatch, block):
    monkeypatch.setattr(model, "ATTENTION_BLOCK", block)
    jax.clear_caches()  # compiled programs keep the block size they were traced with


def test_uncached_blocks_equal_plain_attention(monkeypatch):
    _with_block(monkeypatch, BLOCK)
    B, S = 3, 3 * BLOCK + 5  # a last block shorter than the others
    q, k, v = _attention_inputs(B, S, S)
    mask = np.ones((B, S), np.int32)
    mask[1, :6] = 0  # left padding
    ctx = model.uncached_context(jnp.asarray(mask))
    for window in (1 << 30, 5):  # full causal and a sliding window
        got = model.causal_attention(q, k, v, ctx, jnp.int32(window), cached=False)
        want = model.attention(q, k, v, ctx, jnp.int32(window))
        real = mask.astype(bool)[..., None]
        np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=1e-6, rtol=0)


def test_cached_blocks_only_where_every_row_has_room(monkeypatch):
    """With a cache, the blocked form needs room for all S new tokens after each row's length. Where a
    row lacks it, forcing blocks reads too few keys (wrong); causal_attention checks and reads them all."""
    _with_block(monkeypatch, BLOCK)
    B, S, T = 2, 2 * BLOCK, 3 * BLOCK
    q, k, v = _attention_inputs(B, S, T, seed=1)
    for lengths, fits in (([BLOCK, 3], True), ([BLOCK, BLOCK + 2], False)):
        lengths = jnp.asarray(lengths, jnp.int32)
        cache = zaya_jax.init_cache(model.ZayaConfig(**CONFIGS["tiny"]), B, T).replace(lengths=lengths)
        ctx = model.cached_context(cache, S)
        want = model.attention(q, k, v, ctx, jnp.int32(1 << 30))
        got = jax.jit(lambda q, k, v, ctx: model.causal_attention(q, k, v, ctx, jnp.int32(1 << 30), cached=True))(
            q, k, v, ctx)
        np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
        forced = model.causal_attention(q, k, v, ctx, jnp.int32(1 << 30), cached=False)  # blocks, unchecked
        assert np.allclose(forced, want, atol=1e-6) == fits


def test_short_inputs_take_the_plain_path(monkeypatch):
    _with_block(monkeypatch, BLOCK)
    calls = []
    plain = model.attention
    monkeypatch.setattr(model, "attention", lambda q, *a: calls.append(q.shape[1]) or plain(q, *a))
    q, k, v = _attention_inputs(1, 2 * BLOCK - 1, 2 * BLOCK - 1)
    model.causal_attention(q, k, v, model.uncached_context(jnp.ones((1, 2 * BLOCK - 1), jnp.int32)), 1 << 30, False)
    assert calls == [2 * BLOCK - 1]
    calls.clear()
    q, k, v = _attention_inputs(1, 2 * BLOCK, 2 * BLOCK)
    model.causal_attention(q, k, v, model.uncached_context(jnp.ones((1, 2 * BLOCK), jnp.int32)), 1 << 30, False)
    assert calls == [BLOCK, BLOCK]
    calls.clear()  # more new tokens than cache slots: no block could be exact
    q, k, v = _attention_inputs(1, 2 * BLOCK, 2 * BLOCK - 1)
    cache = zaya_jax.init_cache(model.ZayaConfig(**CONFIGS["tiny"]), 1, 2 * BLOCK - 1)
    model.causal_attention(q, k, v, model.cached_context(cache, 2 * BLOCK), 1 << 30, True)
    assert calls == [2 * BLOCK]


def test_model_logits_and_gradients_unchanged_by_blocks(tiny, monkeypatch):
    """The whole model, uncached (training) and cached (a prefill chunk after a prefix), blocks vs none."""
    config, params = tiny
    B, S = 1, 3 * BLOCK
    ids = jnp.asarray(np.random.default_rng(2).integers(1, config.vocab_size, (B, S)), jnp.int32)
    ctx = model.uncached_context(jnp.ones((B, 2 * BLOCK), jnp.int32))

    def loss(p):  # "gather": the cheapest MoE to compile; the blocks are in attention
        logits, _, _ = model.apply(p, config, ids[:, : 2 * BLOCK], ctx, moe_impl="gather")
        return jnp.mean(jax.nn.log_softmax(logits)[..., 1])

    def extend(p, c, t):
        return model.apply(p, config, t, model.cached_context(c, t.shape[1]), c)[:2]

    prefix = zaya_jax.init_cache(config, B, S + BLOCK)
    _, prefix = jax.jit(extend)(params, prefix, ids[:, :BLOCK])  # 8 tokens: never in blocks
    runs = {}
    for block in (1 << 30, BLOCK):
        _with_block(monkeypatch, block)
        runs[block] = (jax.jit(jax.value_and_grad(loss))(params), jax.jit(extend)(params, prefix, ids[:, BLOCK:])[0])
    (value, grads), logits = runs[BLOCK]
    (value0, grads0), logits0 = runs[1 << 30]
    np.testing.assert_allclose(value, value0, rtol=1e-6)
    np.testing.assert_allclose(logits, logits0, atol=1e-5, rtol=0)
    for g, g0 in zip(jax.tree.leaves(grads), jax.tree.leaves(grads0)):
        np.testing.assert_allclose(g, g0, atol=1e-6, rtol=1e-4)
