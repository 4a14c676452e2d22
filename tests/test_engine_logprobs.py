"""The engine's log-probs (``Engine.submit(logprobs=, prompt_logprobs=)``): the model's own, equal to
``forward``'s log-softmax in float32, across prefill chunks, past the prefix cache, for emitted tokens at any
sampling knobs; ``max_new_tokens=0`` scores a prompt and emits nothing."""

import jax
import numpy as np
import pytest

from zaya_jax import forward, load
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.infer import Engine

TOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return load(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def engine(model):
    config, params = model
    return Engine(params, config, slots=2, max_len=64, decode_steps=4, prefill_chunk=16)


def log_softmax(model, ids) -> np.ndarray:
    config, params = model
    return np.asarray(jax.nn.log_softmax(forward(params, config, np.asarray([ids]))[0], axis=-1))


def check(entries, ids, start, ref, k):
    """``entries`` are the log-probs of ``ids[start:]`` (each after what precedes it) with the top ``k``."""
    assert [e.token for e in entries] == ids[start:]
    rows = np.arange(start - 1, len(ids) - 1)
    np.testing.assert_allclose([e.logprob for e in entries], ref[rows, ids[start:]], atol=TOL, rtol=0)
    for e, row in zip(entries, rows):
        best = np.argsort(-ref[row])[:k]
        assert [t for t, _ in e.top] == best.tolist()
        np.testing.assert_allclose([v for _, v in e.top], ref[row, best], atol=TOL, rtol=0)


def run(engine, *requests):
    while not all(r.done for r in requests):
        engine.step()


def test_prompt_log_probs_span_chunks_and_bypass_the_prefix_cache(engine, model):
    rng = np.random.default_rng(0)
    prompt = [2] + rng.integers(5, 101, 40).tolist()  # 3 prefill chunks of 16
    warm = engine.submit(prompt, max_new_tokens=2)  # saves the prompt's two whole blocks in the prefix cache
    run(engine, warm)
    hits = engine.stats()["prefix_hits"]
    scored = engine.submit(prompt, max_new_tokens=0, prompt_logprobs=3)
    sampled = engine.submit(prompt[:35], max_new_tokens=6, temperature=0.8, top_p=0.9, top_k=7, seed=4, logprobs=2,
                            prompt_logprobs=0)
    run(engine, scored, sampled)
    assert engine.stats()["prefix_hits"] == hits  # both ran their whole prompts: cached blocks have no logits
    assert scored.tokens == [] and scored.stop_reason == "max_new_tokens" and scored.token_logprobs == []
    assert scored.prompt_logprobs[0] is None and sampled.prompt_logprobs[0] is None
    check(scored.prompt_logprobs[1:], prompt, 1, log_softmax(model, prompt), 3)
    ids = prompt[:35] + sampled.tokens
    ref = log_softmax(model, ids)
    check(sampled.prompt_logprobs[1:], prompt[:35], 1, ref, 0)
    check(sampled.token_logprobs, ids, 35, ref, 2)  # the model's, not the filtered distribution's
    assert len(sampled.tokens) == 6

    again = engine.submit(prompt, max_new_tokens=2)  # a plain request still starts from the cache
    run(engine, again)
    assert engine.stats()["prefix_hits"] == hits + 1 and again.token_logprobs == [] and again.prompt_logprobs is None


def test_generate_returns_log_probs_when_asked(engine, model):
    prompts = [[2, 22, 17, 23], [2, 30, 31, 35, 36]]
    out = engine.generate(prompts, max_new_tokens=5, logprobs=1, stop_token_ids=[])
    assert out.prompt_logprobs is None
    for p, tokens, entries in zip(prompts, out.tokens, out.token_logprobs):
        check(entries, p + tokens, len(p), log_softmax(model, p + tokens), 1)
    assert engine.generate(prompts, max_new_tokens=2).token_logprobs is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(logprobs=21), r"logprobs must be None or an integer in \[0, 20\]"),
    (dict(prompt_logprobs=True), r"prompt_logprobs must be None or an integer"),
    (dict(max_new_tokens=0), r"max_new_tokens must be an integer >= 1 \(0 only with prompt_logprobs\)"),
])
def test_bad_log_prob_requests_are_refused(engine, kwargs, match):
    with pytest.raises(ValueError, match=match):
        engine.submit([2, 22], **{"max_new_tokens": 2, **kwargs})
