"""Sampling filters and token choice: against transformers' warpers and hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from zaya_jax.infer import sampling
from zaya_jax.infer.sampling import SamplingParams, row_keys, seed_key, step_keys

filter_logits = jax.jit(sampling.filter_logits)
sample = jax.jit(sampling.sample)


def kept(logits, **knobs):
    """Boolean [B, V] of the tokens filter_logits keeps."""
    logits = np.asarray(logits, np.float32)
    params = SamplingParams.create(logits.shape[0], **knobs)
    return np.isfinite(np.asarray(filter_logits(jnp.asarray(logits), params)))


def test_top_k_hand_case():
    logits = [[0.0, 3.0, 1.0, 2.0, -1.0], [5.0, 4.0, 3.0, 2.0, 1.0]]
    np.testing.assert_array_equal(kept(logits, temperature=1.0, top_k=[2, 1]),
                                  [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    # top_k = 0 keeps everything; ties with the k-th value are kept.
    np.testing.assert_array_equal(kept([[1.0, 2.0, 2.0, 0.0]], temperature=1.0, top_k=[0]), [[1, 1, 1, 1]])
    np.testing.assert_array_equal(kept([[1.0, 2.0, 2.0, 0.0]], temperature=1.0, top_k=[1]), [[0, 1, 1, 0]])


def test_top_p_hand_case():
    # Probabilities 0.5, 0.25, 0.125, 0.125: top_p 0.6 needs the first two, 0.5 only the first.
    logits = np.log([[0.5, 0.25, 0.125, 0.125]] * 3)
    np.testing.assert_array_equal(kept(logits, temperature=1.0, top_p=[0.6, 0.5, 0.8]),
                                  [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_min_p_hand_case():
    # min_p 0.3 of the top probability 0.5 is 0.15: keeps 0.5 and 0.25.
    logits = np.log([[0.5, 0.25, 0.125, 0.125], [0.5, 0.25, 0.125, 0.125]])
    np.testing.assert_array_equal(kept(logits, temperature=1.0, min_p=[0.3, 0.0]), [[1, 1, 0, 0], [1, 1, 1, 1]])


def test_temperature_scales_before_filters():
    """At temperature 2 the distribution flattens, so the same top_p keeps more tokens."""
    logits = np.log([[0.7, 0.2, 0.1]] * 2)
    np.testing.assert_array_equal(kept(logits, temperature=[1.0, 2.0], top_p=0.85), [[1, 1, 0], [1, 1, 1]])
    out = np.asarray(filter_logits(jnp.asarray(logits, jnp.float32), SamplingParams.create(2, temperature=[1.0, 2.0])))
    np.testing.assert_allclose(out[1], logits[1] / 2, rtol=1e-6)


def hf_filter(logits, temperature, top_k, top_p, min_p):
    """transformers' warpers in generate's order, one row at a time."""
    rows = []
    for b in range(logits.shape[0]):
        x = torch.as_tensor(logits[b : b + 1])
        warpers = [TemperatureLogitsWarper(float(temperature[b]))]
        if top_k[b] > 0:
            warpers.append(TopKLogitsWarper(int(top_k[b])))
        if top_p[b] < 1.0:
            warpers.append(TopPLogitsWarper(float(top_p[b])))
        if min_p[b] > 0.0:
            warpers.append(MinPLogitsWarper(float(min_p[b])))
        for w in warpers:
            x = w(None, x)
        rows.append(x.numpy()[0])
    return np.stack(rows)


def test_filters_match_transformers_warpers():
    rng = np.random.default_rng(0)
    B, V = 64, 300
    logits = (rng.standard_normal((B, V)) * rng.uniform(0.5, 4.0, (B, 1))).astype(np.float32)
    temperature = rng.uniform(0.3, 2.0, B).astype(np.float32)
    top_k = rng.choice([0, 1, 5, 40, 300], B).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5, 0.1], B).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.2], B).astype(np.float32)
    params = SamplingParams.create(B, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    ours = np.asarray(filter_logits(jnp.asarray(logits), params))
    ref = hf_filter(logits, temperature, top_k, top_p, min_p)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6)
    # The rows exercised every filter: some tokens removed, and more than one kept somewhere.
    assert (~finite).any(axis=1).sum() > B // 2 and (finite.sum(axis=1) > 1).any()


def test_temperature_zero_is_greedy():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((6, 50)), jnp.float32)
    params = SamplingParams.create(6, temperature=0.0, top_k=3, top_p=0.5)
    out = sample(logits, params, row_keys(0, 6))
    np.testing.assert_array_equal(out, np.argmax(logits, axis=-1))
    # A mixed batch: greedy rows stay greedy next to sampled rows.
    params = SamplingParams.create(6, temperature=[0.0, 5.0, 0.0, 5.0, 0.0, 5.0])
    out = np.asarray(sample(logits, params, row_keys(0, 6)))
    np.testing.assert_array_equal(out[::2], np.argmax(logits, axis=-1)[::2])


def test_fixed_seed_is_reproducible_and_seeds_differ():
    logits = jnp.zeros((4, 1000), jnp.float32)
    params = SamplingParams.create(4, temperature=1.0)
    a = [np.asarray(sample(logits, params, step_keys(row_keys(7, 4), s))) for s in range(5)]
    b = [np.asarray(sample(logits, params, step_keys(row_keys(7, 4), s))) for s in range(5)]
    c = [np.asarray(sample(logits, params, step_keys(row_keys(8, 4), s))) for s in range(5)]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Steps draw differently, and so do rows sharing a seed.
    assert len({tuple(x) for x in a}) > 1 and len(set(a[0].tolist())) > 1


def test_every_64_bit_seed_has_its_own_key():
    """Seeds differing only in the high 32 bits (0 and 2**32, -1 and 2**32 - 1) get different keys; seeds in
    [0, 2**32) keep jax.random.key's; the key is jax.random.key's with 64-bit integers enabled."""
    data = lambda key: tuple(np.asarray(jax.random.key_data(key)).tolist())  # noqa: E731
    seeds = [0, 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, -1, -(2**31), -(2**32), 2**63 - 1, -(2**63)]
    assert len({data(seed_key(s)) for s in seeds}) == len(seeds)
    assert data(seed_key(np.int64(5))) == data(jax.random.key(5))
    for s in (0, 1, 2**31, 2**32 - 1):
        assert data(seed_key(s)) == data(jax.random.key(s))
    with jax.enable_x64():
        for s in seeds:
            assert data(seed_key(s)) == data(jax.random.key(int(s)))
    for bad in (2**63, -(2**63) - 1, 1.5, None, True, "1"):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-9223372036854775808, "):
            seed_key(bad)


def test_samples_follow_the_filtered_distribution():
    """Empirical frequencies of 20000 draws match softmax of the filtered logits (5 sigma)."""
    logits = jnp.asarray(np.log([[0.4, 0.3, 0.15, 0.1, 0.05]] * 2), jnp.float32)
    params = SamplingParams.create(2, temperature=1.0, top_k=[3, 0], top_p=[1.0, 0.8])
    expected = np.asarray(jax.nn.softmax(filter_logits(logits, params), axis=-1))
    draws = jax.vmap(lambda s: sample(logits, params, step_keys(row_keys(0, 2), s)))(jnp.arange(20000))
    draws = np.asarray(draws)
    for b in range(2):
        freq = np.bincount(draws[:, b], minlength=5) / len(draws)
        sigma = np.sqrt(expected[b] * (1 - expected[b]) / len(draws))
        assert (np.abs(freq - expected[b]) <= 5 * sigma + 1e-12).all(), (b, freq, expected[b])
    np.testing.assert_allclose(expected[0], [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-5)
    np.testing.assert_allclose(expected[1], [0.4 / 0.85, 0.3 / 0.85, 0.15 / 0.85, 0, 0], rtol=1e-5)


@pytest.mark.parametrize("knobs, message", [
    (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(min_p=1.5), "min_p"),
    (dict(temperature=[1.0, 1.0]), "one value per prompt"),
])
def test_bad_knobs_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams.create(3, **knobs)
