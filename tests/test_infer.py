"""Decode cache and generation against references: cached logits vs the full forward, greedy
generation vs transformers' ``generate``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_ref
import zaya_jax
from zaya_jax.infer import engine, generate

LENGTHS = [11, 6, 1]  # a left-padded batch of unequal prompts, with a 1-token row
# Untied heads keep random models from greedily repeating their last token, so 32 greedy steps
# exercise positions, the conv state and the sliding window.
GREEDY_CONFIGS = {
    "untied": (hf_ref.CONFIGS["untied"], 2),
    "sliding_untied": (dict(hf_ref.CONFIGS["sliding"], tie_word_embeddings=False), 2),
}

prefill = jax.jit(engine.prefill, static_argnames=("config", "moe_impl"))
decode_step = jax.jit(engine.decode_step, static_argnames=("config", "moe_impl"))


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
    """Every decode step's logits equal the uncached forward at the same position, for one-token
    steps and for a multi-token continuation from a cache (sliding window 4 is crossed)."""
    config, params = checkpoint
    rng = np.random.default_rng(4)
    prompt, mask = hf_ref.left_padded(LENGTHS, config.vocab_size, seed=5)
    S, new = prompt.shape[1], 7
    cont = rng.integers(1, config.vocab_size, (len(LENGTHS), new))
    full = np.concatenate([prompt, cont], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(cont)], axis=1)
    ref = np.asarray(zaya_jax.forward(params, config, full, full_mask))
    starts = jnp.asarray(S - np.array(LENGTHS), jnp.int32)

    def fresh():
        return zaya_jax.init_cache(config, len(LENGTHS), S + new + 1).replace(starts=starts)

    # Prefill, then one token per step.
    logits, cache = prefill(params, config, jnp.asarray(prompt, jnp.int32), fresh())
    errs = [np.abs(np.asarray(logits) - ref[:, S - 1]).max()]
    for i in range(new):
        logits, cache = decode_step(params, config, cache, jnp.asarray(cont[:, i], jnp.int32))
        errs.append(np.abs(np.asarray(logits) - ref[:, S + i]).max())
    assert max(errs) <= 1e-4, errs
    assert int(cache.index) == S + new

    # Prefill, a 3-token continuation, then one token per step.
    _, cache = prefill(params, config, jnp.asarray(prompt, jnp.int32), fresh())
    logits, cache = prefill(params, config, jnp.asarray(cont[:, :3], jnp.int32), cache)
    errs = [np.abs(np.asarray(logits) - ref[:, S + 2]).max()]
    for i in range(3, new):
        logits, cache = decode_step(params, config, cache, jnp.asarray(cont[:, i], jnp.int32))
        errs.append(np.abs(np.asarray(logits) - ref[:, S + i]).max())
    assert max(errs) <= 1e-4, errs


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
