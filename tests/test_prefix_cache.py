"""The engine's prefix cache: tokens identical with it on and off (greedy and sampled, sliding-window
layers, CCA kernels of other and odd sizes), prompts longer than what is cached, eviction under its
bound, and the counters that say what it served."""

import jax
import numpy as np
import pytest

import zaya_jax
from zaya_jax.infer import Engine
from zaya_jax.infer.scheduler import PREFIX_BLOCK

BASE = dict(vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=40, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
            initializer_range=0.2, max_position_embeddings=512, layer_types=["hybrid", "hybrid_sliding"],
            sliding_window=8)
CONFIGS = {"sliding window": zaya_jax.ZayaConfig(**BASE),
           "cca kernels 3 and 5": zaya_jax.ZayaConfig(**BASE, cca_time0=3, cca_time1=5)}
MAX_LEN = 192


def shared_prefix_prompts(n=12, seed=0):
    """Prompts that share a 37-token header (two whole blocks), some a longer one, each with its own tail."""
    rng = np.random.default_rng(seed)
    header = rng.integers(1, 256, 37).tolist()
    longer = header + rng.integers(1, 256, 30).tolist()
    return [(longer if i % 3 == 0 else header) + rng.integers(1, 256, rng.integers(1, 40)).tolist()
            for i in range(n)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tokens_are_identical_with_the_prefix_cache_on_and_off(name):
    config = CONFIGS[name]
    params = zaya_jax.init(config, jax.random.key(1))
    prompts = shared_prefix_prompts()
    for knobs in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, seed=5)):
        runs = {}
        for on in (True, False):
            engine = Engine(params, config, slots=4, max_len=MAX_LEN, decode_steps=8, prefix_cache=on)
            runs[on] = engine.generate(prompts, max_new_tokens=12, stop_token_ids=[], **knobs), engine.stats()
        (on, stats_on), (off, stats_off) = runs[True], runs[False]
        assert on.tokens == off.tokens and on.stop_reasons == off.stop_reasons
        assert stats_on["prompt_tokens"] == stats_off["prompt_tokens"] == sum(map(len, prompts))
        assert stats_off["prefix_hits"] == 0 and stats_off["prefill_tokens"] == stats_off["prompt_tokens"]
        # 4 slots: the first group (at most 4) prefills whole; every later one starts from the header's blocks.
        assert stats_on["prefix_hits"] >= len(prompts) - 4
        assert stats_on["prefix_tokens"] >= (len(prompts) - 4) * 2 * PREFIX_BLOCK
        assert stats_on["prefill_tokens"] == stats_on["prompt_tokens"] - stats_on["prefix_tokens"]


def test_a_prompt_far_longer_than_its_cached_prefix_prefills_the_rest_in_chunks():
    config = CONFIGS["sliding window"]
    params = zaya_jax.init(config, jax.random.key(2))
    rng = np.random.default_rng(3)
    header = rng.integers(1, 256, 20).tolist()
    prompts = [header + [9], header + rng.integers(1, 256, 130).tolist()]  # the second: 1 block cached, 134 to go
    outs, stats = {}, {}
    for on in (True, False):
        engine = Engine(params, config, slots=1, max_len=MAX_LEN, prefill_chunk=32, prefix_cache=on)
        outs[on] = engine.generate(prompts, max_new_tokens=10, stop_token_ids=[]).tokens
        stats[on] = engine.stats()
    assert outs[True] == outs[False]
    assert stats[True]["prefix_hits"] == 1 and stats[True]["prefix_tokens"] == PREFIX_BLOCK
    assert stats[True]["prefill_calls"] == 1 + 5 and stats[False]["prefill_calls"] == 1 + 5  # 134 and 150 tokens


def test_the_cache_stays_within_its_bound_and_evicts_the_least_recently_used():
    config = CONFIGS["sliding window"]
    params = zaya_jax.init(config, jax.random.key(3))
    rng = np.random.default_rng(4)
    headers = [rng.integers(1, 256, 2 * PREFIX_BLOCK).tolist() for _ in range(3)]
    prompt = lambda h, tail: headers[h] + [tail]  # noqa: E731
    engine = Engine(params, config, slots=1, max_len=MAX_LEN, prefix_cache_tokens=4 * PREFIX_BLOCK)
    seen = []
    for h, tail in ((0, 1), (1, 2), (0, 3), (2, 4), (0, 5), (1, 6)):
        before = engine.stats()["prefix_tokens"]
        engine.generate([prompt(h, tail)], max_new_tokens=3, stop_token_ids=[])
        seen.append(engine.stats()["prefix_tokens"] - before)
        assert len(engine._scheduler.prefix) <= 4
    # Two headers fit: 0 stays (used again), 2 evicts 1, so 1 misses at the end.
    assert seen == [0, 0, 2 * PREFIX_BLOCK, 0, 2 * PREFIX_BLOCK, 0]
    assert engine.prefix_cache_bytes > 0
    off = Engine(params, config, slots=1, max_len=MAX_LEN, prefix_cache=False)
    assert off.prefix_cache_bytes == 0 and off.stats()["prefix_hits"] == 0


def test_stats_count_what_the_engine_did():
    config = CONFIGS["sliding window"]
    params = zaya_jax.init(config, jax.random.key(4))
    engine = Engine(params, config, slots=2, max_len=64, decode_steps=4, prefix_cache=False)
    prompts = [[3, 4, 5]] * 2 + [[7] * 10]
    out = engine.generate(prompts, max_new_tokens=[9, 9, 6], stop_token_ids=[])  # longest first: input order
    stats = engine.stats()
    assert stats["requests"] == 3 and stats["prompt_tokens"] == 16
    assert stats["prefill_tokens"] == 13 and stats["prefill_rows"] == 2  # the repeated prompt is prefilled once
    assert stats["decode_tokens"] == sum(len(t) for t in out.tokens) - 3  # each first token comes from its prefill
    # The two repeated prompts run steps 1-8 together; the third then runs 5 steps with one slot busy.
    assert stats["decode_steps"] == 13
    assert stats["slot_utilisation"] == stats["decode_tokens"] / (2 * stats["decode_steps"])
