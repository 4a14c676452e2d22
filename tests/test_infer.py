"""Decode cache and generation against references: cached logits vs the full forward, greedy
generation vs transformers' ``generate``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_ref
import zaya_jax
from zaya_jax.infer import decode, generate

LENGTHS = [11, 6, 1]  # a left-padded batch of unequal prompts, with a 1-token row
# Untied heads keep random models from greedily repeating their last token, so 32 greedy steps
# exercise positions, the conv state and the sliding window.
GREEDY_CONFIGS = {
    "untied": (hf_ref.CONFIGS["untied"], 2),
    "sliding_untied": (dict(hf_ref.CONFIGS["sliding"], tie_word_embeddings=False), 2),
}

prefill = jax.jit(decode.prefill_chunk, static_argnames=("config", "moe_impl"))


@functools.partial(jax.jit, static_argnames="config")
def decode_step(params, config, cache, token, active):
    """One token per row (``active`` rows only); next-token logits [B, V] and the cache."""
    ctx = zaya_jax.model.cached_context(cache, 1, active)
    logits, cache, _ = zaya_jax.apply(params, config, token[:, None], ctx, cache)
    return logits[:, 0], cache


def prompts_of(ids, lengths):
    return [ids[b, ids.shape[1] - n:].tolist() for b, n in enumerate(lengths)]


# Sliding window 4 and a 5-frame conv state (cca_time0=3, cca_time1=4) in one model.
SLIDING_CONV = dict(hf_ref.CONFIGS["heads_conv"], num_hidden_layers=4, sliding_window=4,
                    layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("sliding_conv")
    hf_ref.build(SLIDING_CONV, path, seed=3, skip_bias=0.05)
    config, params = zaya_jax.load(path)
    return config, params


def test_cached_decoding_equals_full_forward(checkpoint):
    """Rows of unequal lengths in one cache, each at its own position: every decode step's logits equal
    the uncached forward at the same position, for one-token steps, for a chunked prefill, and with a
    row idle for some steps (sliding window 4 is crossed)."""
    config, params = checkpoint
    rng = np.random.default_rng(4)
    prompt, mask = hf_ref.left_padded(LENGTHS, config.vocab_size, seed=5)
    S, new, B = prompt.shape[1], 7, len(LENGTHS)
    cont = rng.integers(1, config.vocab_size, (B, new))
    full = np.concatenate([prompt, cont], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
    ref = np.asarray(zaya_jax.forward(params, config, full, full_mask))  # row b's last prompt token at S - 1
    rows = prompts_of(prompt, LENGTHS)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    V = config.vocab_size

    def right_padded(chunks, width):  # chunks: per row, the tokens of this call
        out = np.zeros((B, width), np.int32)
        for b, c in enumerate(chunks):
            out[b, : len(c)] = c
        return jnp.asarray(out), jnp.asarray([len(c) for c in chunks], jnp.int32)

    def fresh():
        return zaya_jax.init_cache(config, B, S + new + 1)

    # Prefill in one chunk, then one token per step.
    tokens, n = right_padded(rows, S)
    logits, cache = prefill(params, config, fresh(), tokens, n, jnp.zeros((B, V)))
    errs = [np.abs(np.asarray(logits) - ref[:, S - 1]).max()]
    for i in range(new):
        logits, cache = decode_step(params, config, cache, jnp.asarray(cont[:, i], jnp.int32), jnp.ones((B,), jnp.int32))
        errs.append(np.abs(np.asarray(logits) - ref[:, S + i]).max())
    assert max(errs) <= 1e-4, errs
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + new)

    # Prefill in chunks of 4 (rows end in different chunks), then row 1 idles for two steps.
    cache, logits = fresh(), jnp.zeros((B, V))
    for start in range(0, S, 4):
        tokens, n = right_padded([r[start:start + 4] for r in rows], 4)
        logits, cache = prefill(params, config, cache, tokens, n, logits)
    errs = [np.abs(np.asarray(logits) - ref[:, S - 1]).max()]
    step = [0] * B
    for active in ([1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]):
        token = jnp.asarray([cont[b, step[b]] for b in range(B)], jnp.int32)
        logits, cache = decode_step(params, config, cache, token, jnp.asarray(active, jnp.int32))
        for b in range(B):
            if active[b]:
                errs.append(np.abs(np.asarray(logits[b]) - ref[b, S + step[b]]).max())
                step[b] += 1
    assert max(errs) <= 1e-4, errs
    np.testing.assert_array_equal(np.asarray(cache.lengths), np.asarray(lengths) + np.asarray(step))


@pytest.mark.parametrize("name", sorted(GREEDY_CONFIGS))
def test_greedy_matches_transformers_generate(name, tmp_path):
    kwargs, seed = GREEDY_CONFIGS[name]
    model = hf_ref.build(kwargs, tmp_path, seed=seed)
    ids, mask = hf_ref.left_padded(LENGTHS, model.config.vocab_size, seed=2)
    with torch.no_grad():
        out = model.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                             max_new_tokens=32, eos_token_id=None, pad_token_id=0)
    ref = out[:, ids.shape[1]:].numpy()
    config, params = zaya_jax.load(tmp_path)
    result = generate(params, config, prompts_of(ids, LENGTHS), max_new_tokens=32, stop_token_ids=[])
    assert result.stop_reasons == ["max_new_tokens"] * 3
    np.testing.assert_array_equal(np.array(result.tokens), ref)
    assert min(len(set(row)) for row in result.tokens) >= 5, "degenerate continuation proves little"


def test_bfloat16_cache_holds_bits_updated_in_place(tmp_path):
    """A bfloat16 cache holds its values' bit patterns as uint16: XLA:CPU computed every bf16 cache write
    in float32 over the WHOLE cache (once per layer per step), which the compiled decode step shows as
    float32 arrays of the cache's shape (22 of them here before). Cached bf16 decoding still follows the
    bf16 forward: same top-1 everywhere, logits within a few bf16 ulps."""
    hf_ref.build(SLIDING_CONV, tmp_path, seed=3, skip_bias=0.05)
    config, params = zaya_jax.load(tmp_path, dtype=jnp.bfloat16)
    values = jnp.asarray([0.0, -0.0, 1.5, -3e38, 1e-40, jnp.inf, -jnp.inf], jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(zaya_jax.cache.from_bits(zaya_jax.cache.to_bits(values, jnp.bfloat16),
                                                                       jnp.bfloat16)), np.asarray(values))
    rng = np.random.default_rng(4)
    prompt, mask = hf_ref.left_padded(LENGTHS, config.vocab_size, seed=5)
    S, new, B = prompt.shape[1], 7, len(LENGTHS)
    cont = rng.integers(1, config.vocab_size, (B, new))
    ref = np.asarray(zaya_jax.forward(params, config, np.concatenate([prompt, cont], axis=1),
                                      np.concatenate([mask, np.ones_like(cont)], axis=1)))
    rows = prompts_of(prompt, LENGTHS)
    tokens = np.zeros((B, S), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
    T = S + new + 1
    cache = zaya_jax.init_cache(config, B, T, jnp.bfloat16)
    assert cache.dtype == jnp.bfloat16 and {a.dtype for a in (cache.k, cache.v, cache.conv, cache.v_prev)} == {np.dtype(np.uint16)}
    logits, cache = prefill(params, config, cache, jnp.asarray(tokens), jnp.asarray([len(r) for r in rows], jnp.int32),
                            jnp.zeros((B, config.vocab_size)))
    got, want = [np.asarray(logits)], [ref[:, S - 1]]
    for i in range(new):
        logits, cache = decode_step(params, config, cache, jnp.asarray(cont[:, i], jnp.int32), jnp.ones((B,), jnp.int32))
        got.append(np.asarray(logits))
        want.append(ref[:, S + i])
    got, want = np.stack(got), np.stack(want)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    ulp = 2.0**-8 * np.abs(want).max()  # bf16 resolution at the largest logit
    assert np.abs(got - want).max() <= 4 * ulp, (np.abs(got - want).max(), ulp)

    # The engine's slot pool (insert copies prefill rows into it) holds bits too: its greedy tokens follow.
    first = generate(params, config, rows, max_new_tokens=1, temperature=0.0, stop_token_ids=[])
    np.testing.assert_array_equal([t[0] for t in first.tokens], got[0].argmax(-1))

    step = decode_step.lower(params, config, cache, jnp.asarray(cont[:, 0], jnp.int32), jnp.ones((B,), jnp.int32))
    whole_cache_f32 = f"f32[{config.num_hidden_layers},{B},{T},"
    assert whole_cache_f32 not in step.compile().as_text()
