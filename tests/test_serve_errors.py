"""`zaya serve` under bad requests and load: OpenAI error objects with 400 / 401 / 429, and the server
keeps serving after each."""

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from serve_util import demo_server, wait_for  # noqa: E402

KEY = "sekret"
MODEL = "zaya-demo"
SLOTS, QUEUE, BODY_LIMIT = 2, 2, 4096
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "12+34+56"}], "max_tokens": 4, "temperature": 0}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", str(SLOTS), "--max-queue", str(QUEUE), "--api-key", KEY,
                     "--max-body-bytes", str(BODY_LIMIT)) as u:
        yield u


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
        yield c


def assert_error(response, status, param=None, code=None, match=""):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and match in error["message"], error
    assert error["param"] == param and (code is None or error["code"] == code), error


def assert_serving(http):
    out = http.post("/v1/chat/completions", json=CHAT)
    assert out.status_code == 200 and out.json()["choices"][0]["message"]["content"], out.text


def test_api_key_on_every_route_but_health(url, http):
    assert httpx.get(f"{url}/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        assert_error(httpx.get(f"{url}/v1/models", headers=headers), 401, code="invalid_api_key")
        assert_error(httpx.get(f"{url}/metrics", headers=headers), 401, code="invalid_api_key")
        assert_error(httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=headers), 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http.get("/metrics").status_code == 200  # the API key, when no --metrics-key is set
    assert_serving(http)


@pytest.mark.parametrize("route, change, param, match", [
    ("chat", {"model": "gpt-4o"}, "model", "does not exist"),
    ("chat", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ("chat", {"max_tokens": 1010}, "max_tokens", "beyond the context"),
    ("completions", {"prompt": [5] * 1024}, "prompt", "1024 tokens; the maximum length"),
    ("chat", {"temperature": "hot"}, "temperature", "valid number"),
    ("chat", {"messages": "12+34"}, "messages", "valid list"),
    ("chat", {"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'user'"),
    ("chat", {"stop": ["a", "b", "c", "d", "e"]}, "stop", "5 stop strings; at most 4"),
    ("chat", {"top_p": 0}, "top_p", "greater than 0"),
    ("chat", {"n": 0}, "n", "greater than or equal to 1"),
    ("completions", {"prompt": "1+2", "suffix": "!"}, "suffix", "not supported"),
    ("chat", {"top_logprobs": 3}, "top_logprobs", "top_logprobs needs logprobs=true"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "less than or equal to 20"),
    ("completions", {"prompt": "1+2", "logprobs": -1}, "logprobs", "greater than or equal to 0"),
    ("completions", {"prompt": "1+2", "max_tokens": 0}, "max_tokens", "it needs echo=true"),
    ("chat", {"rsa": {"population": 2, "tails": 1}, "logprobs": True}, "logprobs", "does not apply to an rsa request"),
    ("chat", {"rsa": {"mode": "light"}}, "rsa", "beyond the context"),
    ("chat", {"rsa": {"population": 4, "tails": 8}}, "rsa", "cannot exceed population"),
    ("chat", {"rsa": {"bogus": 1}}, "rsa.bogus", "Extra inputs"),
    # Each of these once reached the engine's thread and stopped it (every later request got 503).
    ("chat", {"seed": 2 ** 63}, "seed", "less than or equal to 9223372036854775807"),
    ("completions", {"prompt": "1+2", "seed": -(2 ** 63) - 1}, "seed", "greater than or equal to"),
    ("chat", {"rsa": {"population": 2, "tails": 1}, "temperature": 1e39}, None, "temperature"),
    ("chat", {"rsa": {"population": 2, "tails": 1}, "top_p": 1e-50}, None, "top_p"),
    ("chat", {"rsa": {"rounds": 33}}, "rsa.rounds", "less than or equal to 32"),
    ("chat", {"n": SLOTS + QUEUE + 1}, "n", f"needs {SLOTS + QUEUE + 1} sequences; this server holds 4 at most"),
    ("chat", {"rsa": {"population": 8, "tails": 2, "rounds": 1, "budget": 8, "tail_tokens": 4}}, "rsa.population",
     "needs 8 sequences; this server holds 4 at most"),
    ("chat", {"max_tokens": True}, "max_tokens", "valid integer"),  # JSON types as sent: true was 1
    ("chat", {"max_tokens": "5"}, "max_tokens", "valid integer"),
    ("chat", {"stream": "yes"}, "stream", "valid boolean"),
    ("chat", {"stop_token_ids": [2 ** 31]}, "stop_token_ids", "id 2147483648 is not a token id in the vocabulary"),  # was a 500
    ("chat", {"stop_token_ids": list(range(20, 36))}, "stop_token_ids", "17 stop token ids; at most 16 (Engine max_stop_ids) (the EOS ids [4] included)"),
])
def test_bad_request_gets_400_and_the_next_one_succeeds(http, route, change, param, match):
    body = {**CHAT, **change}
    if route == "completions":
        body.pop("messages")
    if "rsa" in change:
        body.pop("max_tokens")
    assert_error(http.post(f"/v1/{route.replace('chat', 'chat/completions')}", json=body), 400, param, match=match)
    assert_serving(http)


def test_unreadable_bodies_get_400(http):
    assert_error(http.post("/v1/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}),
                 400, match="not valid JSON")
    assert_error(http.post("/v1/chat/completions", json=[CHAT]), 400, match="JSON object")
    big = {**CHAT, "messages": [{"role": "user", "content": "1" * BODY_LIMIT}]}
    assert_error(http.post("/v1/chat/completions", json=big), 400, code="body_too_large", match="over the limit")
    # Chunked (no Content-Length): refused as the limit is passed, not after reading the whole body.
    chunks = (b"x" * 1024 for _ in range(4096))
    assert_error(http.post("/v1/chat/completions", content=chunks, headers={"Content-Type": "application/json"}),
                 400, code="body_too_large", match=f"request body is over the limit of {BODY_LIMIT} bytes")
    assert_serving(http)


def test_a_full_queue_answers_429(url, http):
    long = {**CHAT, "stream": True, "ignore_eos": True, "max_tokens": 900, "temperature": 1.0}
    streams = [http.stream("POST", "/v1/chat/completions", json=long) for _ in range(SLOTS + QUEUE)]
    try:
        for s in streams:  # headers back: each is accepted, running or queued
            assert s.__enter__().status_code == 200
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(**CHAT)
        assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    # Released once the engine has applied the cancels (at its next step, which may first compile).
    assert wait_for(lambda: http.get("/health").json()["in_flight"] == 0, timeout=60)
    assert_serving(http)


def _cancelled(http):
    return http.get("/health").json()["finished"].get("cancelled", 0)


def test_a_client_that_goes_away_before_the_answer_frees_its_slots(url, http):
    before = _cancelled(http)
    body = {**CHAT, "temperature": 1.0, "ignore_eos": True, "max_tokens": 900, "n": 4}  # 4 x 900 tokens, 2 slots
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
    # Cancelled (the engine may first be compiling this prompt length), not run to the end; the rows stay
    # reserved until then.
    assert wait_for(lambda: http.get("/health").json()["in_flight"] == 0, timeout=60)
    health = http.get("/health").json()
    assert _cancelled(http) - before == 4 and health["running"] == 0 and health["waiting"] == 0, health
    assert_serving(http)


def test_a_client_that_leaves_an_rsa_stream_cancels_the_search(http):
    before = _cancelled(http)
    body = {**CHAT, "temperature": 1.0, "stream": True, "rsa": {"population": 2, "tails": 1, "rounds": 8}}
    body.pop("max_tokens")
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert any("rsa_progress" in line for line in lines)  # round 0 is done; 8 rounds to go
    seen = []

    def idle() -> bool:
        seen.append(http.get("/health").json())
        return seen[-1]["in_flight"] == 0 and seen[-1]["running"] == 0 and seen[-1]["waiting"] == 0

    assert wait_for(idle, timeout=60, interval=0.01)
    # The rows stay reserved until the engine has finished the search's requests: each round left is submitted
    # and cancelled (2 members each, the current round's included), a running one at the next step.
    assert all(h["in_flight"] or not (h["running"] or h["waiting"]) for h in seen), seen
    assert _cancelled(http) - before >= 2, http.get("/health").text
    assert_serving(http)
