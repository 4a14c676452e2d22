"""The server's Prometheus metrics (``GET /metrics``), in a registry of its own per app.

Request-side: HTTP requests by route and status (``RequestCounter``, an ASGI middleware), and per
generation request the prompt and generated tokens of its usage and histograms of its timings
(``jobs.Timing``). Engine-side: the driver's published load and ``Engine.stats()``, read at each scrape.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.routing import Match

from .jobs import Timing

# Upper bounds in seconds (as vLLM's): first token, time per output token, whole request / queue.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

ENGINE_HELP = {
    "requests": "Engine requests admitted to a slot (a request with n choices is n)",
    "prompt_tokens": "Prompt tokens of the engine requests admitted",
    "prefill_tokens": "Tokens run through prefill (a prompt shared by several requests once, less the prefix cache's)",
    "prefix_hits": "Prefills that started from the prefix cache",
    "prefix_tokens": "Prompt tokens loaded from the prefix cache instead of prefilled",
    "decode_steps": "Decode steps run",
    "decode_tokens": "Tokens emitted by decode steps (each request's first token comes from its prefill)",
    "prefill_calls": "Prefill program calls",
    "prefill_rows": "Prefill rows run",
    "decode_calls": "Decode program calls",
}


class Metrics:
    """A registry of the server's metrics; ``render()`` is the /metrics body."""

    def __init__(self, driver, in_flight):
        self.registry = CollectorRegistry()
        self.requests = Counter("zaya_http_requests", "HTTP requests answered, by route and status code",
                                ["route", "status"], registry=self.registry)
        self.prompt_tokens = Counter("zaya_prompt_tokens", "Prompt tokens of the generation requests answered "
                                     "(their usage)", registry=self.registry)
        self.generation_tokens = Counter("zaya_generation_tokens", "Completion tokens of the generation requests "
                                         "answered (their usage)", registry=self.registry)
        self.ttft = Histogram("zaya_time_to_first_token_seconds", "From a request received to its first token "
                              "reaching its handler", buckets=TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("zaya_time_per_output_token_seconds", "From a request's first token to its end, per "
                              "later token of its longest choice", buckets=TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram("zaya_e2e_request_latency_seconds", "From a request received to its last token",
                             buckets=LATENCY_BUCKETS, registry=self.registry)
        self.queue = Histogram("zaya_request_queue_time_seconds", "From a request received to the start of the "
                               "engine step that admitted it to a slot", buckets=LATENCY_BUCKETS,
                               registry=self.registry)
        self.registry.register(_EngineCollector(driver, in_flight))

    def answered(self, usage: dict, timing: Timing, longest: int | None = None) -> None:
        """Records a generation request answered with ``usage``; ``longest``: the tokens of its longest
        choice (None: a request without per-token timings, an RSA search)."""
        end = time.perf_counter()
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        self.e2e.observe(end - timing.received)
        if longest is None:
            return
        if timing.admitted is not None:
            self.queue.observe(max(timing.admitted - timing.received, 0.0))
        if timing.first_token is not None:
            self.ttft.observe(timing.first_token - timing.received)
            if longest > 1:
                self.tpot.observe((end - timing.first_token) / (longest - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """The driver's load and the engine's counters as they were last published, read at each scrape."""

    def __init__(self, driver, in_flight):
        self.driver, self.in_flight = driver, in_flight

    def collect(self):
        load = self.driver.load
        yield GaugeMetricFamily("zaya_num_requests_running", "Engine requests in a slot", value=load["running"])
        yield GaugeMetricFamily("zaya_num_requests_waiting", "Engine requests waiting for a slot",
                                value=load["waiting"])
        yield GaugeMetricFamily("zaya_num_requests_in_flight", "Engine requests reserved by HTTP requests (running, "
                                "waiting or being tokenized)", value=self.in_flight())
        stats = self.driver.stats
        yield GaugeMetricFamily("zaya_slot_utilisation", "Tokens decoded per slot and decode step since the start",
                                value=stats["slot_utilisation"])
        for name, text in ENGINE_HELP.items():
            yield CounterMetricFamily(f"zaya_engine_{name}", text, value=stats[name])


class RequestCounter:
    """ASGI middleware counting HTTP requests by route (the app's route path; ``other`` for none) and the
    status code answered, and stamping ``scope["state"]["received"]`` (``time.perf_counter``)."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault("state", {})["received"] = time.perf_counter()
        status = [500]  # what the client gets when the app raises before answering

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(self._route(scope), str(status[0])).inc()

    def _route(self, scope) -> str:
        for route in self.routes():
            if route.matches(scope)[0] is not Match.NONE:
                return route.path
        return "other"
