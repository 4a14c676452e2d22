"""Log-probs and prompt scoring through `zaya serve` and the official openai client: every number is the
model's own (``forward``'s log-softmax in float32, within 1e-4), streamed or not, completions and chat."""

import jax
import numpy as np
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_util import demo_server  # noqa: E402

from zaya_jax import forward, load  # noqa: E402
from zaya_jax.demo import DEFAULT_MODEL_DIR  # noqa: E402
from zaya_jax.infer.tokenizer import Tokenizer  # noqa: E402

MODEL = "zaya-demo"
TOL = 1e-4


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", "4") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model():
    config, params = load(DEFAULT_MODEL_DIR)
    return config, params, Tokenizer.from_dir(DEFAULT_MODEL_DIR)


def log_softmax(model, ids, temperature=1.0) -> np.ndarray:
    """forward's log-softmax [S, V] of ``ids`` (at ``temperature``): row i is the distribution of token i + 1."""
    config, params, _ = model
    logits = forward(params, config, np.asarray([ids]))[0]
    return np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))


def ids_of(tok, strings) -> list[int]:
    """The demo tokenizer spells every token (special ones included) as a vocabulary entry of its own."""
    return [tok.tokenizer.token_to_id(s) for s in strings]


def check_completion_top(tok, top: dict, row: np.ndarray, token: int, k: int) -> None:
    """A completion's top_logprobs entry: the k most likely tokens and the chosen one, at forward's values."""
    best = np.argsort(-row)[:k]
    want = {tok.decode([t]): row[t] for t in best} | {tok.decode([token]): row[token]}
    assert top.keys() == want.keys()
    np.testing.assert_allclose([top[s] for s in want], list(want.values()), atol=TOL, rtol=0)


def test_echo_scores_the_prompt_as_forward_does(client, model):
    """echo with max_tokens 0 (a batch of token-id prompts, and text) and with max_tokens 1 (what lm-eval's
    local-completions sends for a log-likelihood): the first prompt token has null, the others forward's
    log-softmax of the next token, with the top k and the chosen token."""
    tok = model[2]
    prompts = [[2, 22, 17, 23, 35, 24, 17, 30], tok.encode("47+85+26=158")]
    for max_tokens in (0, 1):
        out = client.completions.create(model=MODEL, prompt=prompts, max_tokens=max_tokens, echo=True, logprobs=5,
                                        temperature=0)
        assert out.usage.completion_tokens == max_tokens * len(prompts)
        for choice, ids in zip(out.choices, prompts):
            lp = choice.logprobs
            assert choice.finish_reason == "length" or max_tokens  # one token may be the end-of-sequence one
            ids_all = ids + ids_of(tok, lp.tokens[len(ids):])
            assert len(lp.tokens) == len(ids_all) == len(ids) + max_tokens
            assert choice.text == tok.decode(ids_all, skip_special_tokens=True)
            assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            assert lp.text_offset == np.cumsum([0] + [len(s) for s in lp.tokens[:-1]]).tolist()
            ref = log_softmax(model, ids_all)
            np.testing.assert_allclose(lp.token_logprobs[1:], ref[np.arange(len(ids_all) - 1), ids_all[1:]],
                                       atol=TOL, rtol=0)
            for i in range(1, len(ids_all)):
                check_completion_top(tok, lp.top_logprobs[i], ref[i - 1], ids_all[i], 5)
    text = client.completions.create(model=MODEL, prompt="12+34", max_tokens=0, echo=True, logprobs=0)
    ids = tok.encode("12+34")
    assert text.choices[0].text == "12+34" and text.usage.prompt_tokens == len(ids)
    ref = log_softmax(model, ids)
    np.testing.assert_allclose(text.choices[0].logprobs.token_logprobs[1:], ref[np.arange(len(ids) - 1), ids[1:]],
                               atol=TOL, rtol=0)
    assert [len(t) for t in text.choices[0].logprobs.top_logprobs[1:]] == [1] * (len(ids) - 1)  # k = 0: the chosen
    echoed = client.completions.create(model=MODEL, prompt="12+34", max_tokens=0, echo=True)
    assert echoed.choices[0].text == "12+34" and echoed.choices[0].logprobs is None


def test_sampled_tokens_log_probs_are_the_models_streamed_or_not(client, model):
    """At temperature 0.7 with top-k 5 the log-probs are the model's (temperature 1, unfiltered), not those of
    the distribution the filters leave; the streamed pieces concatenate to the whole."""
    tok = model[2]
    prompt = [2, 22, 17, 23, 35]
    kwargs = dict(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.7, seed=3, logprobs=3,
                  extra_body={"top_k": 5, "ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0]
    lp = whole.logprobs
    ids = prompt + ids_of(tok, lp.tokens)
    assert len(lp.tokens) == 16 and whole.text == tok.decode(ids[len(prompt):], skip_special_tokens=True)
    rows = np.arange(len(prompt) - 1, len(ids) - 1)
    ref = log_softmax(model, ids)
    np.testing.assert_allclose(lp.token_logprobs, ref[rows, ids[len(prompt):]], atol=TOL, rtol=0)
    scaled = log_softmax(model, ids, temperature=0.7)[rows, ids[len(prompt):]]
    assert np.max(np.abs(np.asarray(lp.token_logprobs) - scaled)) > 100 * TOL  # the choice is observable
    for j, top in enumerate(lp.top_logprobs):
        check_completion_top(tok, top, ref[rows[j]], ids[len(prompt) + j], 3)

    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == whole.text
    joined = {f: sum((getattr(c.logprobs, f) for c in chunks), []) for f in ("tokens", "token_logprobs",
                                                                              "top_logprobs", "text_offset")}
    assert joined["tokens"] == lp.tokens and joined["text_offset"] == lp.text_offset
    np.testing.assert_allclose(joined["token_logprobs"], lp.token_logprobs, atol=1e-6, rtol=0)
    assert [t.keys() for t in joined["top_logprobs"]] == [t.keys() for t in lp.top_logprobs]


def test_chat_logprobs_streamed_and_not(client, model):
    """Chat's logprobs.content: one entry per token generated (the message's, then the end-of-turn token that
    stopped it), with top_logprobs the k most likely, equal to forward's; streamed the same."""
    tok = model[2]
    messages = [{"role": "user", "content": "47+85+26"}]
    prompt = tok.encode_chat(messages)
    kwargs = dict(model=MODEL, messages=messages, max_tokens=40, temperature=0, logprobs=True, top_logprobs=4)
    choice = client.chat.completions.create(**kwargs).choices[0]
    content = choice.logprobs.content
    tokens = [c.token for c in content]
    assert choice.finish_reason == "stop" and tokens[-1] == "<end_of_turn>"
    assert "".join(tokens[:-1]) == choice.message.content
    ids = prompt + ids_of(tok, [c.token for c in content])
    ref = log_softmax(model, ids)
    for j, c in enumerate(content):
        row = ref[len(prompt) - 1 + j]
        best = np.argsort(-row)[:4]
        assert ids[len(prompt) + j] == best[0]  # greedy
        assert c.bytes == list(c.token.encode()) and abs(c.logprob - row[best[0]]) <= TOL
        assert [t.token for t in c.top_logprobs] == [tok.decode([t]) for t in best]
        np.testing.assert_allclose([t.logprob for t in c.top_logprobs], row[best], atol=TOL, rtol=0)

    streamed = [c.choices[0] for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    pieces = sum((c.logprobs.content for c in streamed if c.logprobs is not None), [])
    assert [p.token for p in pieces] == [c.token for c in content]
    np.testing.assert_allclose([p.logprob for p in pieces], [c.logprob for c in content], atol=1e-6, rtol=0)
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None
