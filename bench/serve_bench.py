"""`zaya serve` under load, as `vllm bench serve` measures it: requests arriving at a Poisson rate, at
most a given number in flight.

Starts `zaya serve` on the shipped demo model (or uses ``--url``) and sends ``--requests`` streaming chat
requests of distinct addition problems through the official openai client. Arrival gaps are exponential
with mean ``1 / --request-rate`` (``inf``: all at once); a request that arrives while ``--max-concurrency``
are in flight waits for one to finish, and its times count from when it is sent. Each request generates
exactly ``--max-tokens`` tokens (``ignore_eos``). The whole run is made once untimed first (compiling the
shapes it meets), then timed. Prints requests/s, output tokens/s and time to first token (TTFT), time per
output token after the first (TPOT: (latency - TTFT) / (tokens - 1)), inter-token latency (ITL: the gap
between consecutive streamed chunks; a chunk holds up to ``--decode-steps`` tokens) and end-to-end
latency, at mean, p50, p90 and p99.

    python bench/serve_bench.py [--requests 64] [--request-rate 4] [--max-concurrency 16] [--max-tokens 64]
                                [--slots 64] [--url http://...] [--json OUT]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import random
import time

import numpy as np
import openai

from zaya_jax.demo import arith
from zaya_jax.infer.serve.launch import running_server

TIMEOUT_S = 600  # one request at most; every loop below is bounded by the request count
PERCENTILES = (50, 90, 99)


def one(client, model: str, question: str, max_tokens: int, seed: int) -> dict:
    """The timings (seconds) and tokens of one streamed chat request."""
    t0 = time.perf_counter()
    arrivals, tokens = [], 0  # when each chunk with text arrived
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=1.0,
        seed=seed, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.perf_counter() - t0)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    ttft = arrivals[0] if arrivals else latency
    return {"ttft": ttft, "latency": latency, "tokens": tokens, "itl": np.diff(arrivals).tolist(),
            "tpot": (latency - ttft) / (tokens - 1) if tokens > 1 else None}


def run(client, model: str, questions: list[str], max_tokens: int, rate: float, concurrency: int,
        seed: int) -> dict:
    """Sends ``questions`` at Poisson ``rate`` per second (inf: at once), ``concurrency`` at most in flight."""
    gaps = random.Random(seed)
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures, arrival = [], 0.0
        for i, q in enumerate(questions):
            time.sleep(max(arrival - (time.perf_counter() - t0), 0.0))
            futures.append(pool.submit(one, client, model, q, max_tokens, i))
            arrival += gaps.expovariate(rate) if rate != float("inf") else 0.0
        results = [f.result(timeout=TIMEOUT_S) for f in futures]
    wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    series = {"ttft": [r["ttft"] for r in results], "tpot": [r["tpot"] for r in results if r["tpot"] is not None],
              "itl": [gap for r in results for gap in r["itl"]], "e2e": [r["latency"] for r in results]}
    return {"wall_s": wall, "requests": len(results), "requests_per_s": len(results) / wall,
            "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
            **{name: summary(values) for name, values in series.items()}}


def summary(values: list[float]) -> dict:
    """Mean and percentiles (linear interpolation, as numpy and vLLM), in milliseconds."""
    ms = np.asarray(values, float) * 1e3
    return {"mean_ms": float(ms.mean()), **{f"p{q}_ms": float(np.percentile(ms, q)) for q in PERCENTILES}}


def table(r: dict) -> str:
    head = (f"{r['requests']} requests in {r['wall_s']:.1f} s: {r['requests_per_s']:.2f} requests/s, "
            f"{r['output_tokens_per_s']:.0f} output tokens/s\n\n")
    rows = ["| ms | mean | p50 | p90 | p99 |", "|---|---:|---:|---:|---:|"]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "end-to-end latency")):
        s = r[name]
        rows.append(f"| {label} | " + " | ".join(f"{s[k]:.0f}" for k in ("mean_ms", "p50_ms", "p90_ms", "p99_ms"))
                    + " |")
    return head + "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"),
                   help="mean arrivals per second, Poisson (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="of the arrival times")
    p.add_argument("--slots", type=int, default=64, help="the server's slots (when this script starts it)")
    p.add_argument("--decode-steps", type=int, default=8, help="the server's decode steps per round trip (when "
                                                               "this script starts it)")
    p.add_argument("--url", help="an already running server (default: start one on the demo model)")
    p.add_argument("--model", default="zaya-demo")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args()
    if args.requests < 1 or args.request_rate <= 0:
        p.error("--requests and --request-rate must be positive")
    concurrency = args.max_concurrency or args.requests
    questions = [arith.Problem((11 + i % 80, 23 + (7 * i) % 70, 35 + (3 * i) % 60)).question
                 for i in range(args.requests)]
    server = contextlib.nullcontext(args.url) if args.url else running_server(
        "--slots", str(args.slots), "--max-queue", str(args.requests), "--decode-steps", str(args.decode_steps))
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        work = (client, args.model, questions, args.max_tokens, args.request_rate, concurrency, args.seed)
        run(*work)  # untimed: compiles the shapes this run meets
        result = run(*work)
    print(f"\nstreaming chat, demo model, {args.slots} slots; request rate {args.request_rate:g}/s (Poisson), "
          f"max concurrency {concurrency}, {args.max_tokens} output tokens each\n")
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(vars(args), result=result), f, indent=1)


if __name__ == "__main__":
    main()
