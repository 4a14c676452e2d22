"""Generation mechanics on a small random model: greedy = argmax of the forward, stop reasons,
streaming, reproducible sampling, bounded recompiles, donation, input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_ref
import zaya_jax
from zaya_jax.infer import Engine, decode, generate

LENGTHS = [11, 6, 1]
MAX_LEN = 20  # max_position_embeddings: an 11-token prompt has room for 9 new tokens
TINY = zaya_jax.ZayaConfig(**dict(hf_ref.CONFIGS["sliding"], max_position_embeddings=MAX_LEN, tie_word_embeddings=False))
# Every call below with 3 prompts shares one bucket (4 rows, 16 prompt slots, 16 output slots).


@pytest.fixture(scope="module")
def params():
    return zaya_jax.init(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
    ids, _ = hf_ref.left_padded(LENGTHS, TINY.vocab_size, seed=6)
    return [ids[b, ids.shape[1] - n:].tolist() for b, n in enumerate(LENGTHS)]


@pytest.fixture(scope="module")
def greedy(params, prompts):
    return generate(params, TINY, prompts, max_new_tokens=9, stop_token_ids=[])


def test_greedy_equals_argmax_of_forward(params, prompts, greedy):
    """Each greedy token is the argmax of the full forward over prompt + previous tokens."""
    assert greedy.stop_reasons == ["max_new_tokens"] * 3 and [len(t) for t in greedy.tokens] == [9] * 3
    seqs = [p + t for p, t in zip(prompts, greedy.tokens)]
    ids, mask = np.zeros((3, MAX_LEN), np.int32), np.zeros((3, MAX_LEN), np.int32)
    for b, seq in enumerate(seqs):
        ids[b, MAX_LEN - len(seq):], mask[b, MAX_LEN - len(seq):] = seq, 1
    logits = np.asarray(zaya_jax.forward(params, TINY, ids, mask))
    for b, new in enumerate(greedy.tokens):
        np.testing.assert_array_equal(np.argmax(logits[b, MAX_LEN - 10 : -1], axis=-1), new)


def test_stop_tokens_end_rows(params, prompts, greedy):
    stop = greedy.tokens[0][3]
    result = generate(params, TINY, prompts, max_new_tokens=9, stop_token_ids=[stop])
    for row, full, reason in zip(result.tokens, greedy.tokens, result.stop_reasons):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
        assert reason == ("stop_token" if stop in full else "max_new_tokens")
    assert result.tokens[0][-1] == stop


def test_stop_ids_default_to_eos(params):
    engine = Engine(params, TINY.replace(eos_token_id=(5, 7)), slots=1, max_stop_ids=4)
    np.testing.assert_array_equal(engine.stop_id_row(None), [5, 7, -1, -1])
    np.testing.assert_array_equal(engine.stop_id_row([]), [-1] * 4)
    with pytest.raises(ValueError, match="5 stop token ids; at most 4"):
        engine.stop_id_row(range(1, 6))


def test_per_row_max_new_tokens(params, prompts, greedy):
    result = generate(params, TINY, prompts, max_new_tokens=[5, 9, 1], stop_token_ids=[])
    assert result.tokens == [g[:n] for g, n in zip(greedy.tokens, [5, 9, 1])]
    assert result.stop_reasons == ["max_new_tokens"] * 3


def test_cache_full_is_reported(params, prompts, greedy):
    """Rows whose prompt plus output reaches the maximum length stop with "cache_full", never silently."""
    # max_position_embeddings (20) caps the 11-token row at 9 new tokens.
    result = generate(params, TINY, prompts, max_new_tokens=12, stop_token_ids=[])
    assert result.stop_reasons == ["cache_full", "max_new_tokens", "max_new_tokens"]
    assert len(result.tokens[0]) == MAX_LEN - 11 and result.tokens[0] == greedy.tokens[0]
    # So does max_cache_len.
    result = generate(params, TINY, prompts, max_new_tokens=9, stop_token_ids=[], max_cache_len=14)
    assert result.stop_reasons == ["cache_full", "cache_full", "max_new_tokens"]
    assert [len(p) + len(t) for p, t in zip(prompts, result.tokens)] == [14, 14, 10]
    assert all(t == g[: len(t)] for t, g in zip(result.tokens, greedy.tokens))
    # A count past 64 bits is still "more than fits": every row runs to the context, none stops short.
    result = generate(params, TINY, prompts, max_new_tokens=10**20, stop_token_ids=[])
    assert result.stop_reasons == ["cache_full"] * 3 and result.tokens[0] == greedy.tokens[0]
    assert [len(p) + len(t) for p, t in zip(prompts, result.tokens)] == [MAX_LEN] * 3


def test_streaming_delivers_every_token_once(params, prompts):
    chunks = []
    knobs = dict(max_new_tokens=[9, 4, 7], temperature=0.8, seed=2, stop_token_ids=[])
    result = generate(params, TINY, prompts, stream=chunks.append, stream_interval=3, **knobs)
    assert len(chunks) >= 3
    assert [sum((c[b] for c in chunks), []) for b in range(3)] == result.tokens
    assert generate(params, TINY, prompts, **knobs).tokens == result.tokens


def test_sampling_is_reproducible(params, prompts, greedy):
    knobs = dict(max_new_tokens=9, stop_token_ids=[], temperature=[1.0, 0.0, 0.7], top_k=[0, 0, 20], top_p=0.9)
    a = generate(params, TINY, prompts, seed=11, **knobs)
    b = generate(params, TINY, prompts, seed=11, **knobs)
    c = generate(params, TINY, prompts, seed=12, **knobs)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert a.tokens[1] == greedy.tokens[1]  # the temperature-0 row is greedy
    assert a.tokens[0] != greedy.tokens[0]
    # A row's draws depend on its index and the seed, not on the rest of the batch.
    alone = generate(params, TINY, prompts[:1], seed=11, max_new_tokens=9, stop_token_ids=[], temperature=1.0)
    assert alone.tokens[0] == a.tokens[0]


def test_varied_requests_reuse_compiled_programs(params):
    """Prompt lengths, knobs, limits, seeds and stop ids inside one bucket never recompile."""
    generate(params, TINY, [[1, 2, 3]], max_new_tokens=3)
    before = dict(decode.TRACES)
    assert before["decode"] >= 1 and before["insert"] >= 1 and before["prefill_chunk"] >= 1
    generate(params, TINY, [[4] * 12], max_new_tokens=3, temperature=1.0, top_k=5, seed=3)
    generate(params, TINY, [[5, 6]], max_new_tokens=16, temperature=0.5, top_p=0.8, min_p=0.1,
             stop_token_ids=[7, 8, 9, 10], max_cache_len=12)
    generate(params, TINY, [[9]], max_new_tokens=1, temperature=0.0, top_k=3)
    assert dict(decode.TRACES) == before


def test_decode_state_is_donated(params):
    """The decode loop consumes its input slot pool (cache included) instead of copying it."""
    state = decode.init_slots(zaya_jax.init_cache(TINY, 2, MAX_LEN), 4)
    out, *_ = decode.decode_compiled(params, TINY, state, jnp.zeros((2,), bool), steps=4, moe_impl="auto")
    assert state.cache.k.is_deleted() and state.cache.conv.is_deleted() and state.token.is_deleted()
    assert not out.cache.k.is_deleted()


@pytest.mark.parametrize("prompts, message", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2], [1, 300]], r"prompt 1 has token id\(s\) \[300\] outside the vocabulary \[0, 256\)"),
    ([[1, -1]], "outside the vocabulary"),
    ([list(range(1, 21))], "prompt 0 has 20 tokens; the maximum length"),
    ([], "prompts is empty"),
    ("hello", "token-id sequences"),
    ([[1.5, 2.0]], "integer token ids"),
])
def test_bad_prompts_are_named(params, prompts, message):
    with pytest.raises(ValueError, match=message):
        generate(params, TINY, prompts, max_new_tokens=4)


def test_bad_max_new_tokens(params):
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1"):
        generate(params, TINY, [[1, 2]], max_new_tokens=0)


@pytest.mark.parametrize("top_k, message", [
    (2**32 + 1, r"top_k must be in \[-2147483648, 2147483647\]"),  # would wrap to 1 in int32
    (2**31, r"top_k must be in"),
    (10**20, "top_k must be integers of at most 64 bits"),
])
def test_top_k_beyond_int32_is_refused_not_wrapped(params, top_k, message):
    with pytest.raises(ValueError, match=message):
        generate(params, TINY, [[1, 2]], max_new_tokens=2, temperature=1.0, top_k=top_k)


def test_decode_steps_are_capped_at_max_len(params):
    """More steps per call than a row can take would only grow the [slots, steps] token buffer."""
    assert Engine(params, TINY, slots=1, max_len=16, decode_steps=10**12).decode_steps == 16
    assert Engine(params, TINY, slots=1, max_len=12, decode_steps=16).decode_steps == 16  # 16 cache slots
