"""The engine: results independent of slots, batch company and chunking; memory bounded by the pool;
stop reasons (cache_full alone, non_finite), streaming and cancellation, prefix sharing, RSA interleaving."""

import jax
import numpy as np
import pytest

import zaya_jax
from zaya_jax.infer import Engine, decode, generate, rsa

# Untied head and a wide init: a random model whose greedy continuations vary (not one token repeated).
CONFIG = zaya_jax.ZayaConfig(
    vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=40, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
    initializer_range=0.2, max_position_embeddings=512, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8,
)
MAX_LEN = 512
STOPS = [7, 11, 13]


@pytest.fixture(scope="module")
def params():
    return zaya_jax.init(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def workload():
    """32 prompts with 1..120 new tokens each: one of 300 tokens (the 512-token prompt bucket), the rest of
    1..200 (prompt + output <= 420)."""
    rng = np.random.default_rng(0)
    lengths = np.concatenate([[1, 300, 17, 16], rng.integers(1, 201, 28)])
    prompts = [rng.integers(1, CONFIG.vocab_size, n).tolist() for n in lengths]
    max_new = rng.integers(1, 121, len(lengths)).tolist()
    return prompts, max_new


@pytest.fixture(scope="module")
def greedy(params, workload):
    prompts, max_new = workload
    result = generate(params, CONFIG, prompts, max_new_tokens=max_new, stop_token_ids=STOPS)
    assert "stop_token" in result.stop_reasons and "max_new_tokens" in result.stop_reasons
    assert len({t for row in result.tokens for t in row}) > 50, "degenerate greedy reference"
    return result


# One slot (requests strictly one after another) and 16 (32 requests through 16 slots: refills mid-run).
@pytest.mark.parametrize("slots", [1, 16])
def test_greedy_equals_generate_at_any_slot_count(params, workload, greedy, slots):
    prompts, max_new = workload
    engine = Engine(params, CONFIG, slots=slots, max_len=MAX_LEN, decode_steps=8)
    out = engine.generate(prompts, max_new_tokens=max_new, stop_token_ids=STOPS)
    assert out.tokens == greedy.tokens and out.stop_reasons == greedy.stop_reasons
    stats = engine.stats()
    assert stats["decode_tokens"] + len(prompts) == sum(len(t) for t in out.tokens)  # the first tokens come from insert
    assert not engine.busy and engine.running == 0


def test_greedy_equals_generate_prompt_by_prompt(params, workload, greedy):
    prompts, max_new = workload
    for i in (0, 1, 5, 17):
        alone = generate(params, CONFIG, [prompts[i]], max_new_tokens=max_new[i], stop_token_ids=STOPS)
        assert alone.tokens[0] == greedy.tokens[i]


def test_sampled_tokens_do_not_depend_on_slots(params, workload):
    prompts, max_new = workload
    prompts, max_new = prompts[:24], [min(m, 48) for m in max_new[:24]]
    knobs = dict(max_new_tokens=max_new, temperature=1.0, top_p=0.9, stop_token_ids=STOPS, seed=3)
    ref = generate(params, CONFIG, prompts, **knobs)
    for slots in (4, 16):
        out = Engine(params, CONFIG, slots=slots, max_len=MAX_LEN).generate(prompts, **knobs)
        assert out.tokens == ref.tokens and out.stop_reasons == ref.stop_reasons
    other = generate(params, CONFIG, prompts, **dict(knobs, seed=4))
    assert other.tokens != ref.tokens


def test_chunked_prefill_equals_unchunked(params, workload, greedy):
    prompts, max_new = workload
    pick = [i for i, p in enumerate(prompts) if len(p) > 40][:8]
    engine = Engine(params, CONFIG, slots=4, max_len=MAX_LEN, prefill_chunk=16)
    out = engine.generate([prompts[i] for i in pick], max_new_tokens=[max_new[i] for i in pick], stop_token_ids=STOPS)
    assert out.tokens == [greedy.tokens[i] for i in pick]
    assert engine.stats()["prefill_calls"] >= sum(-(-len(prompts[i]) // 16) for i in pick) / 4


def test_a_request_beyond_max_len_stops_cache_full_alone(params, workload, greedy):
    prompts, max_new = workload
    engine = Engine(params, CONFIG, slots=2, max_len=64)
    short = [prompts[1][i:i + 20] for i in (0, 20, 40)]
    out = engine.generate(short, max_new_tokens=[10**9, 5, 45], stop_token_ids=[])
    assert out.stop_reasons == ["cache_full", "max_new_tokens", "cache_full"]
    assert [len(p) + len(t) for p, t in zip(short, out.tokens)] == [64, 25, 64]
    ref = generate(params, CONFIG, short, max_new_tokens=[44, 5, 44], stop_token_ids=[])
    assert out.tokens == ref.tokens


def test_huge_max_new_tokens_is_bounded_by_the_context(params):
    """max_new_tokens = 10**9 allocates nothing for it: the pool is sized by the context, and the row stops
    "cache_full" at max_position_embeddings (it used to allocate for the number asked)."""
    config = CONFIG.replace(max_position_embeddings=48)
    out = generate(params, config, [[5, 6, 7]], max_new_tokens=10**9, stop_token_ids=[])
    assert out.stop_reasons == ["cache_full"] and len(out.tokens[0]) == 45
    engine = Engine(params, config, slots=3)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 4  # k and v, float32
    assert engine.max_len == 48 and 3 * 48 * per_token <= engine.cache_bytes < 3 * 48 * per_token * 1.1


def test_non_finite_logits_stop_the_row_without_tokens(params):
    """NaN weights never pass as a normal result: the row stops "non_finite" and emits nothing."""
    broken = jax.tree_util.tree_map_with_path(
        lambda path, x: x.at[0, 0].set(np.nan) if "lm_head" in jax.tree_util.keystr(path) else x, params)
    out = generate(broken, CONFIG, [[5, 6, 7], [9]], max_new_tokens=8, stop_token_ids=[])
    assert out.stop_reasons == ["non_finite", "non_finite"] and out.tokens == [[], []]


def test_stream_yields_as_requests_finish_and_cancels_the_rest(params):
    engine = Engine(params, CONFIG, slots=4, max_len=MAX_LEN, decode_steps=4)
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    seen = list(engine.stream(prompts, max_new_tokens=[40, 3, 20, 6], stop_token_ids=[]))
    assert sorted(i for i, _, _ in seen) == [0, 1, 2, 3] and seen[0][0] == 1  # the 3-token request ends first
    assert {i: len(t) for i, t, _ in seen} == {0: 40, 1: 3, 2: 20, 3: 6}
    for i, tokens, reason in engine.stream(prompts, max_new_tokens=[200, 3, 200, 200], stop_token_ids=[]):
        break  # the consumer stops early: its other requests are cancelled, their slots freed
    assert i == 1 and not engine.busy and engine.running == 0
    request = engine.submit([1, 2], max_new_tokens=5)
    engine.cancel(request)
    assert request.stop_reason == "cancelled" and not engine.busy


def test_a_batch_is_admitted_longest_budget_first(params):
    """One slot, so requests finish in the order they are admitted: by budget, max_new_tokens or the room the
    cache leaves after the prompt (request 2: min(40, 64 - 50) = 14), ties in input order."""
    engine = Engine(params, CONFIG, slots=1, max_len=64, decode_steps=4)
    prompts = [[1, 2, 3], [4, 5], [6] * 50, [7, 8]]
    seen = list(engine.stream(prompts, max_new_tokens=[5, 9, 40, 5], stop_token_ids=[]))
    assert [i for i, _, _ in seen] == [2, 1, 0, 3]
    assert {i: (len(t), reason) for i, t, reason in seen} == {
        0: (5, "max_new_tokens"), 1: (9, "max_new_tokens"), 2: (14, "cache_full"), 3: (5, "max_new_tokens")}


def test_cancel_and_callbacks_touch_only_their_own_request(params):
    """Cancelling another engine's request, or one that finishes in the same decode call, stops nothing
    else; a raising on_update reaches the caller only after every other request got its tokens."""
    engine, other = (Engine(params, CONFIG, slots=2, max_len=MAX_LEN, decode_steps=4) for _ in range(2))
    alone = engine.generate([[4, 5], [6]], max_new_tokens=[3, 12], stop_token_ids=[]).tokens

    # a's callback cancels b during the call that finishes b; the next requests in b's slot must run on.
    def cancel_b(request, new):
        if request.done:
            engine.cancel(b)
    engine.submit([6], max_new_tokens=4, stop_token_ids=[], on_update=cancel_b)
    b = engine.submit([4, 5], max_new_tokens=3, stop_token_ids=[])
    while engine.busy:
        engine.step()
    c = [engine.submit([6], max_new_tokens=12, stop_token_ids=[]) for _ in range(2)]  # both slots
    while engine.busy:
        engine.step()
    assert b.stop_reason == "max_new_tokens" and [r.tokens for r in c] == [alone[1]] * 2

    foreign = other.submit([1, 2, 3], max_new_tokens=8, stop_token_ids=[])
    other.step()  # foreign runs in slot 0 of the other engine
    mine = engine.submit([6], max_new_tokens=12, stop_token_ids=[])
    engine.step()  # mine runs in slot 0 here
    engine.cancel(foreign)
    while engine.busy:
        engine.step()
    assert mine.stop_reason == "max_new_tokens" and mine.tokens == alone[1]

    def boom(request, new, raised=[]):
        if request.done and not raised:  # in the decode call that also moves the bystander on
            raised.append(1)
            raise RuntimeError("callback failed")
    failing = engine.submit([4, 5], max_new_tokens=3, stop_token_ids=[], on_update=boom)
    bystander = engine.submit([6], max_new_tokens=12, stop_token_ids=[])
    with pytest.raises(RuntimeError, match="callback failed"):
        while engine.busy:
            engine.step()
    while engine.busy:
        engine.step()
    assert bystander.tokens == alone[1] and failing.done


def test_bad_request_arguments_are_refused_at_submit(params):
    engine = Engine(params, CONFIG, slots=2, max_len=MAX_LEN, decode_steps=4)
    for kwargs, message in [(dict(key=np.zeros(3)), r"key must be key data \[2\] of uint32"),
                            (dict(key=np.array([-1, 0])), "key must be key data"),
                            (dict(stop_token_ids="85"), "stop_token_ids must be a sequence of token ids"),
                            (dict(stop_token_ids=[85.9]), r"stop token id 85.9 is not a token id in the vocabulary \[0, 256\)"),
                            (dict(stop_token_ids=[999]), "stop token id 999 is not a token id"),
                            (dict(stop_token_ids=[True]), "stop token id True"),
                            (dict(seed=2**64), r"seed must be an integer in \[-9223372036854775808"),
                            (dict(seed=1.5), "seed must be an integer"),
                            (dict(index=-1), r"index must be an integer in \[0, 4294967295\]")]:
        with pytest.raises(ValueError, match=message):
            engine.submit([1, 2], max_new_tokens=2, **kwargs)
    assert not engine.busy  # nothing refused was queued
    out = engine.generate(np.array([[1, 2]]), max_new_tokens=2, stop_token_ids=np.array([300 - 299]))
    assert engine.generate(jax.numpy.asarray([[1, 2]]), max_new_tokens=2, stop_token_ids=[1]).tokens == out.tokens


def test_generate_and_stream_check_the_seed_as_submit_does(params):
    engine = Engine(params, CONFIG, slots=2, max_len=MAX_LEN, decode_steps=4)
    for seed in (2**63, 1.5, None, True):
        with pytest.raises(ValueError, match=r"seed must be an integer in \[-9223372036854775808, 9223372036854775807\]"):
            engine.generate([[1, 2]], max_new_tokens=2, seed=seed)
        with pytest.raises(ValueError, match="seed must be an integer"):
            next(engine.stream([[1, 2]], max_new_tokens=2, seed=seed))
    assert not engine.busy
    # Seeds that differ only above the low 32 bits sample differently.
    runs = [engine.generate([[3, 4, 5]], max_new_tokens=8, temperature=1.0, stop_token_ids=[], seed=s).tokens
            for s in (0, 2**32, 0)]
    assert runs[0] == runs[2] != runs[1]


def test_repeated_prompts_are_prefilled_once(params):
    engine = Engine(params, CONFIG, slots=8, max_len=MAX_LEN)
    out = engine.generate([[3, 4, 5]] * 6 + [[9, 9]] * 2, max_new_tokens=6, temperature=1.0, stop_token_ids=[])
    assert engine.stats()["prefill_rows"] == 2
    assert len({tuple(t) for t in out.tokens[:6]}) > 1  # each request still has its own key


def test_bad_engine_settings_are_named(params):
    for kwargs, message in [(dict(slots=0), "slots must be a positive integer"),
                            (dict(max_len=1), "max_len must be an integer >= 2"),
                            (dict(decode_steps=1.5), "decode_steps must be a positive integer"),
                            (dict(slots=10**9), r"the engine's slot state \(1,000,000,000 slots x 64 cache tokens\) "
                                                r"with its prefix cache \(16,000,000,000 tokens\) needs [\d,.]+ GiB, "
                                                r"more than the [\d,.]+ GiB free on the host")]:
        with pytest.raises(ValueError, match=message):
            Engine(params, CONFIG, **{"max_len": 64, **kwargs})
    engine = Engine(params, CONFIG, slots=1, max_len=32)
    with pytest.raises(ValueError, match="prompt has 32 tokens; the maximum length"):
        engine.submit([1] * 32, max_new_tokens=1)


def test_rsa_problems_interleave_and_each_equals_running_alone(params):
    """8 problems on 32 slots (fewer than 8 x 8 members): rounds of different problems overlap, and each
    problem's result is the one it gets alone with the same seed."""
    rng = np.random.default_rng(1)
    questions = [rng.integers(20, 200, rng.integers(3, 12)).tolist() for _ in range(8)]
    template = rsa.TokenTemplate((1,), (2,), (3, 4), (5,), ((6,), (8,)), (9,), (10, 12))
    knobs = dict(population=8, tails=2, rounds=2, budget=10, tail_tokens=4, template=template, seed=2,
                 stop_token_ids=STOPS, extract=lambda tokens: str(tokens[-1]) if tokens else None)
    finished = []
    together = rsa.markov_rsa(params, CONFIG, questions, slots=32, on_problem=lambda p, r: finished.append(p), **knobs)
    assert sorted(finished) == list(range(8))
    for p in (0, 3, 7):
        alone = rsa.markov_rsa(params, CONFIG, questions[p], **knobs)
        for t in range(3):
            assert together.rounds[t].candidates[p] == alone.rounds[t].candidates[0]
            assert together.rounds[t].prompts[p] == alone.rounds[t].prompts[0]
        assert together.majority[p] == alone.majority[0]
    assert decode.TRACES["insert"] >= 1


def test_insert_copies_the_same_rows_on_every_platform():
    """``insert`` copies prefill rows into slots by a loop of in-place row writes on XLA:CPU and by one masked
    merge elsewhere (a TPU pool's rows are split over chips); both give the same pool, bf16 bits included."""
    import jax.numpy as jnp

    from zaya_jax import backend
    from zaya_jax.bench_configs import CONFIGS
    from zaya_jax.cache import init_cache
    from zaya_jax.infer.sampling import SamplingParams

    config = zaya_jax.ZayaConfig(**CONFIGS["tiny"])
    M, G, S, K = 8, 4, 16, 4
    pool = decode.init_slots(init_cache(config, M, 32, jnp.bfloat16), K)
    rng = np.random.default_rng(0)
    cache = init_cache(config, G, S, jnp.bfloat16)
    cache = cache.replace(**{f: jnp.asarray(rng.integers(0, 2**16, getattr(cache, f).shape), jnp.uint16)
                             for f in ("k", "v", "conv", "v_prev")}, lengths=jnp.asarray([3, 16, 9, 1], jnp.int32))
    src, dst = jnp.asarray([2, 0, 2, 1, 0, 0, 0, 0]), jnp.asarray([5, 1, 6, 0, 8, 8, 8, 8])  # 4 requests, then padding
    args = (cache, jnp.asarray(rng.normal(size=(G, config.vocab_size)), jnp.float32), src, dst, jnp.int32(4),
            jax.random.split(jax.random.key(1), M), SamplingParams.create(M), jnp.full((M,), 5, jnp.int32),
            jnp.full((M,), 32, jnp.int32), jnp.full((M, K), -1, jnp.int32))
    on_cpu = decode.insert(pool, *args)
    with backend.target("tpu"):
        elsewhere = decode.insert(pool, *args)
    for a, b in zip(jax.tree.leaves(on_cpu), jax.tree.leaves(elsewhere)):
        np.testing.assert_array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                                 else a),
                                      np.asarray(jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key)
                                                 else b))
    k = np.asarray(on_cpu[0].cache.k)
    np.testing.assert_array_equal(k[:, 5, :, :S], np.asarray(cache.k)[:, 2])  # slot 5 holds prefill row 2
    assert not k[:, 2].any() and not k[:, 7].any()  # untouched slots
