"""`zaya serve`'s /metrics: Prometheus text whose request counts, histograms and token counts match the
requests made through the openai client, and whose engine figures match /health; behind its own key."""

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from serve_util import demo_server, wait_for  # noqa: E402

KEY, METRICS_KEY = "sekret", "scrape-key"
MODEL = "zaya-demo"
TOKENS = 8  # per choice: ignore_eos makes every choice generate exactly this many
HISTOGRAMS = ("zaya_time_to_first_token_seconds", "zaya_time_per_output_token_seconds",
              "zaya_e2e_request_latency_seconds", "zaya_request_queue_time_seconds")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with demo_server(tmp_path_factory, "--slots", "4", "--api-key", KEY, "--metrics-key", METRICS_KEY) as u:
        yield u


def scrape(url) -> dict[tuple, float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain"), response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in parser.text_string_to_metric_families(response.text) for s in family.samples}


def requests_answered(samples, route, status) -> float:
    return samples.get(("zaya_http_requests_total", (("route", route), ("status", str(status)))), 0)


def test_metrics_count_the_requests_made(url):
    engine_before = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=120, max_retries=0)
    knobs = dict(max_tokens=TOKENS, temperature=0, extra_body={"ignore_eos": True})
    messages = [{"role": "user", "content": "47+85+26"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, **knobs)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **knobs))
    streamed = stream[-1].usage
    completion = client.completions.create(model=MODEL, prompt="12+34+56", n=2, **knobs)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-4o", messages=messages, **knobs)
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):  # the metrics key replaces the API key here
        response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    usages = [chat.usage, streamed, completion.usage]
    assert [u.completion_tokens for u in usages] == [TOKENS, TOKENS, 2 * TOKENS]

    # A request is counted once its response has ended, which may be just after the client has read it.
    chat_route = "/v1/chat/completions"
    assert wait_for(lambda: [requests_answered(scrape(url), *k) for k in (
        (chat_route, 200), (chat_route, 400), ("/v1/completions", 200), ("/metrics", 401))] == [2, 1, 1, 2], 15)
    samples = scrape(url)
    assert requests_answered(samples, "/health", 200) >= 1 and requests_answered(samples, "/v1/models", 200) == 0
    for name in HISTOGRAMS:  # one observation per answered generation request
        assert samples[(f"{name}_count", ())] == 3, name
        assert samples[(f"{name}_bucket", (("le", "+Inf"),))] == 3, name
    total = {name: samples[(f"{name}_sum", ())] for name in HISTOGRAMS}
    assert 0 < total["zaya_request_queue_time_seconds"] < total["zaya_time_to_first_token_seconds"]
    assert total["zaya_time_to_first_token_seconds"] < total["zaya_e2e_request_latency_seconds"]
    assert samples[("zaya_prompt_tokens_total", ())] == sum(u.prompt_tokens for u in usages)
    assert samples[("zaya_generation_tokens_total", ())] == sum(u.completion_tokens for u in usages) == 4 * TOKENS

    # Engine side: what /health publishes (the server is idle now), counting each choice as a request.
    engine = httpx.get(f"{url}/health", timeout=30).json()["engine"]
    for name, value in engine.items():
        suffix = "" if name == "slot_utilisation" else "_total"
        prefix = "zaya_" if name == "slot_utilisation" else "zaya_engine_"
        assert samples[(f"{prefix}{name}{suffix}", ())] == pytest.approx(value), name
    added = {k: engine[k] - engine_before[k] for k in ("requests", "prompt_tokens", "decode_tokens")}
    assert added["requests"] == 4
    assert added["prompt_tokens"] == chat.usage.prompt_tokens + streamed.prompt_tokens + 2 * completion.usage.prompt_tokens
    assert added["decode_tokens"] + added["requests"] == 4 * TOKENS  # a request's first token is its prefill's
    assert samples[("zaya_num_requests_running", ())] == samples[("zaya_num_requests_waiting", ())] == 0
    assert samples[("zaya_num_requests_in_flight", ())] == 0
