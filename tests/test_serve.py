"""`zaya serve` through the official openai client: outputs equal `generate` / `markov_rsa` / the engine,
streaming, n samples, stop strings, penalties and logit bias, structured output (every text valid against
its schema), concurrency, and a client that disconnects mid-stream."""

import concurrent.futures
import json
import re

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_util import demo_server, wait_for  # noqa: E402

from zaya_jax import load  # noqa: E402
from zaya_jax.demo import DEFAULT_MODEL_DIR, arith, data  # noqa: E402
from zaya_jax.infer import Engine, generate, markov_rsa  # noqa: E402
from zaya_jax.infer.rsa import TokenTemplate  # noqa: E402
from zaya_jax.infer.tokenizer import Tokenizer  # noqa: E402

SLOTS = 8
MODEL = "zaya-demo"
SCHEMA = {"type": "object", "properties": {"sum": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "unit": {"enum": ["cm", "km"]}},
          "required": ["sum", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", str(SLOTS), "--max-queue", "128") as u:
        yield u


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def model():
    config, params = load(DEFAULT_MODEL_DIR)
    return config, params, Tokenizer.from_dir(DEFAULT_MODEL_DIR)


def chat_ids(tok, question):
    return tok.encode_chat([{"role": "user", "content": question}])


def reference(model, prompts, **kwargs):
    config, params, tok = model
    result = generate(params, config, prompts, **kwargs)
    return [tok.decode(t[:-1] if r == "stop_token" else t, skip_special_tokens=True)
            for t, r in zip(result.tokens, result.stop_reasons)], result


def ask(client, question, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], **kwargs)


def test_models_list(client):
    cards = client.models.list().data
    assert [c.id for c in cards] == [MODEL]


def test_completion_and_chat_at_temperature_0_equal_generate(client, model):
    tok = model[2]
    # A completion prompt is raw text (no chat template); as token ids it is taken as is.
    texts, result = reference(model, [tok.encode("47+85+26"), [2, 10, 20, 30]], max_new_tokens=24)
    for prompt, want, tokens in zip(("47+85+26", [2, 10, 20, 30]), texts, result.tokens):
        out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert out.choices[0].text == want
        assert out.usage.completion_tokens == len(tokens)
    (want,), result = reference(model, [chat_ids(tok, "47+85+26")], max_new_tokens=40)
    out = ask(client, "47+85+26", max_tokens=40, temperature=0)
    assert out.choices[0].message.content == want and "\\boxed{158}" in want
    assert out.choices[0].finish_reason == ("stop" if result.stop_reasons[0] == "stop_token" else "length")
    assert out.usage.prompt_tokens == len(chat_ids(tok, "47+85+26"))
    assert out.usage.completion_tokens == len(result.tokens[0])


def test_stream_concatenates_to_the_non_streamed_text(client):
    for knobs in (dict(temperature=0), dict(temperature=1.0, seed=5)):
        whole = ask(client, "31+62+19+44", max_tokens=48, **knobs).choices[0]
        chunks = list(ask(client, "31+62+19+44", max_tokens=48, stream=True, **knobs))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(chunks) > 3 and text == whole.message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.finish_reason


def test_n_samples_with_a_seed_are_reproducible_and_keyed_as_generate(client, model):
    tok = model[2]
    first = ask(client, "58+27+66", n=4, seed=7, temperature=1.0, max_tokens=40)
    again = ask(client, "58+27+66", n=4, seed=7, temperature=1.0, max_tokens=40)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.message.content for c in again.choices]
    # Choice i is generate's row i for the same seed.
    want, _ = reference(model, [chat_ids(tok, "58+27+66")] * 4, max_new_tokens=40, temperature=1.0, seed=7)
    assert texts == want


def test_stop_strings_cut_the_text_as_openai_does(client):
    full = ask(client, "47+85+26", max_tokens=40, temperature=0).choices[0].message.content
    assert "=132" in full
    for stream in (False, True):
        kwargs = dict(max_tokens=40, temperature=0, stop=["=13", "never"])
        if stream:
            chunks = list(ask(client, "47+85+26", stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = ask(client, "47+85+26", **kwargs).choices[0]
            text, reason = choice.message.content, choice.finish_reason
        assert text == full[: full.index("=13")] and reason == "stop"
    out = client.completions.create(model=MODEL, prompt=[2, 10, 20, 30], max_tokens=24, temperature=0)
    cut = out.choices[0].text[1:3]
    stopped = client.completions.create(model=MODEL, prompt=[2, 10, 20, 30], max_tokens=24, temperature=0, stop=cut)
    assert stopped.choices[0].text == out.choices[0].text[: out.choices[0].text.index(cut)]


def text_and_finish(client, question, stream, **kwargs) -> list[tuple[str, str]]:
    """Each choice's (text, finish_reason) of a chat request, streamed (deltas joined) or not."""
    if not stream:
        return [(c.message.content, c.finish_reason) for c in ask(client, question, **kwargs).choices]
    texts, finish = {}, {}
    for chunk in ask(client, question, stream=True, **kwargs):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            finish[c.index] = c.finish_reason or finish.get(c.index)
    return [(texts[i], finish[i]) for i in sorted(texts)]


def test_penalties_and_logit_bias_equal_the_engine(client, model):
    config, params, tok = model
    equals = tok.tokenizer.token_to_id("=")
    knobs = dict(presence_penalty=1.5, frequency_penalty=0.5, logit_bias={equals: -100})
    engine = Engine(params, config, slots=1, max_len=128, decode_steps=8)
    out = engine.generate([chat_ids(tok, "47+85+26")], max_new_tokens=40, **knobs)
    want = tok.decode(out.tokens[0][:-1] if out.stop_reasons[0] == "stop_token" else out.tokens[0],
                      skip_special_tokens=True)
    assert "=" not in want
    for stream in (False, True):
        body = dict(knobs, logit_bias={str(equals): -100})
        got = text_and_finish(client, "47+85+26", stream, max_tokens=40, temperature=0, **body)
        assert got[0][0] == want
        forced = text_and_finish(client, "47+85+26", stream, max_tokens=8, temperature=1.0,
                                 logit_bias={str(tok.tokenizer.token_to_id("7")): 100})
        assert forced == [("7" * 8, "length")]


def test_response_format_outputs_validate_against_the_schema(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema_format = {"type": "json_schema", "json_schema": {"name": "sum", "schema": SCHEMA, "strict": True}}
    for stream in (False, True):
        choices = text_and_finish(client, "47+85+26", stream, n=3, seed=1, temperature=1.0, max_tokens=64,
                                  response_format=schema_format)
        assert len(choices) == 3 and {f for _, f in choices} == {"stop"}
        for text, _ in choices:
            jsonschema.validate(json.loads(text), SCHEMA)
        (text, finish), = text_and_finish(client, "12+34", stream, temperature=0, max_tokens=64,
                                          response_format={"type": "json_object"})
        assert finish == "stop" and isinstance(json.loads(text), dict)
    # Cut by max_tokens: "length", and the text is the start of what the schema allows.
    (text, finish), = text_and_finish(client, "47+85+26", False, temperature=0, max_tokens=3,
                                      response_format=schema_format)
    assert (text, finish) == ('{"s', "length")


@pytest.mark.parametrize("kwargs, param, message", [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "look", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}}}),
     "response_format", "cannot compile the schema 'look'"),
    (dict(response_format={"type": "json_object"}, extra_body={"ignore_eos": True}), "ignore_eos", "ignore_eos"),
    (dict(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
    (dict(logit_bias={"x": 1}), "logit_bias", "token ids"),
    (dict(logit_bias={"5": 150}), "logit_bias", r"logit_bias of token 5 must be a number in \[-100, 100\]"),
    (dict(logit_bias={"5000": 1}), "logit_bias", "not a token id in the vocabulary"),
])
def test_bad_penalties_and_formats_are_400s_naming_them(client, kwargs, param, message):
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, "1+2", max_tokens=4, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param
    assert re.search(message, e.value.body["message"])


def _health(url):
    return httpx.get(f"{url}/health", timeout=10).json()


def _idle(health: dict) -> bool:
    """Nothing reserved, queued or running, in one snapshot."""
    return health["in_flight"] == 0 and health["waiting"] == 0 and health["running"] == 0


def test_disconnect_frees_slots_and_64_concurrent_requests_equal_each_alone(url, client, model):
    tok = model[2]
    before = _health(url)["finished"]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "12+34+56"}], "stream": True,
            "ignore_eos": True, "max_tokens": 900, "temperature": 1.0}
    with httpx.Client(timeout=60) as http:
        streams = [http.stream("POST", f"{url}/v1/chat/completions", json=body) for _ in range(SLOTS)]
        responses = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in responses]  # kept: a dropped iterator closes its connection
        for it in lines:  # read until each has produced text: every slot is busy generating
            for line in it:
                if '"content": "' in line and '"content": ""' not in line:
                    break
        for s in streams:  # the clients go away mid-stream
            s.__exit__(None, None, None)
    # The slots are freed at once, by cancelling. Under load a stream may reach its 900 tokens before its client
    # leaves (each was read only until its first text); every request is still accounted for exactly once.
    assert wait_for(lambda: _idle(_health(url)), timeout=60)
    after = _health(url)["finished"]
    ended = {reason: n - before.get(reason, 0) for reason, n in after.items() if n != before.get(reason, 0)}
    assert ended.get("cancelled", 0) >= 1 and sum(ended.values()) == SLOTS, ended
    assert set(ended) <= {"cancelled", "max_new_tokens"}, ended

    questions = [arith.Problem((10 + i, 20 + 2 * i, 30 + i % 7)).question for i in range(64)]
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        futures = [pool.submit(ask, client, q, max_tokens=16, temperature=1.0, seed=i) for i, q in enumerate(questions)]
        answers = [f.result(timeout=600).choices[0].message.content for f in futures]
    alone = [reference(model, [chat_ids(tok, q)], max_new_tokens=16, temperature=1.0, seed=i)[0][0]
             for i, q in enumerate(questions)]
    assert answers == alone


def test_rsa_request_returns_the_majority_of_markov_rsa(client, model):
    config, params, tok = model
    knobs = dict(population=4, tails=2, rounds=1, budget=data.BUDGET, tail_tokens=data.TAIL_TOKENS)
    want = markov_rsa(params, config, tok.encode("47+85+26", add_special_tokens=False), **knobs, seed=3,
                      template=TokenTemplate.from_tokenizer(data.TEMPLATE, 2, tok), tokenizer=tok)
    out = ask(client, "47+85+26", seed=3, extra_body={"rsa": knobs})
    ext = out.model_extra["rsa"]
    assert (ext["answer"], ext["share"]) == want.majority[0]
    assert ext["texts"] == want.texts[0] and ext["generated_tokens"] == want.generated_tokens
    assert f"\\boxed{{{ext['answer']}}}" in out.choices[0].message.content
    assert out.usage.completion_tokens == want.generated_tokens
    # Streamed: one progress event per round, then the same result.
    events = [json.loads(c.model_dump_json()) for c in
              ask(client, "47+85+26", seed=3, stream=True, extra_body={"rsa": knobs})]
    assert [e["rsa_progress"]["round"] for e in events if "rsa_progress" in e] == [0, 1]
    assert events[-1]["rsa"]["texts"] == want.texts[0]
    assert events[-1]["choices"][0]["delta"]["content"] == out.choices[0].message.content
    assert out.choices[0].finish_reason == "stop"
    cut = ask(client, "47+85+26", seed=3, extra_body={"rsa": dict(knobs, budget=4, rounds=0)})
    assert cut.choices[0].finish_reason == "length"  # the budget cut the chosen text
