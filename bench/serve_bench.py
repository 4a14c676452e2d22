"""`zaya serve` under load: 64 concurrent streaming clients against the same 64 requests one at a time.

Starts `zaya serve` on the shipped demo model (or uses ``--url``), sends ``--requests`` streaming chat
requests of distinct addition problems through the official openai client — all at once from threads,
then one after another — and prints a markdown table: requests/s, time to first token p50/p99 and
generated tokens/s. Each request generates exactly ``--max-tokens`` tokens (``ignore_eos``), so both
modes do the same work. Each mode runs once untimed first, so compiling is not measured.

    python bench/serve_bench.py [--requests 64] [--max-tokens 64] [--slots 64] [--url http://...]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import statistics
import time

import openai

from zaya_jax.demo import arith
from zaya_jax.infer.serve.launch import running_server

TIMEOUT_S = 600  # one request at most; every loop below is bounded by the request count


def one(client, model: str, question: str, max_tokens: int, seed: int) -> tuple[float, float, int]:
    """(seconds to the first text, seconds in all, tokens generated) of one streamed chat request."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=1.0,
        seed=seed, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return first, time.perf_counter() - t0, tokens


def run(client, model, questions, max_tokens, together: bool) -> dict:
    t0 = time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(one, client, model, q, max_tokens, i) for i, q in enumerate(questions)]
            results = [f.result(timeout=TIMEOUT_S) for f in futures]
    else:
        results = [one(client, model, q, max_tokens, i) for i, q in enumerate(questions)]
    wall = time.perf_counter() - t0
    ttft = sorted(r[0] for r in results)
    return {"wall_s": wall, "requests_per_s": len(results) / wall, "ttft_p50_s": statistics.median(ttft),
            "ttft_p99_s": ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))],
            "tokens_per_s": sum(r[2] for r in results) / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=64, help="the server's slots (when this script starts it)")
    p.add_argument("--url", help="an already running server (default: start one on the demo model)")
    p.add_argument("--model", default="zaya-demo")
    args = p.parse_args()
    questions = [arith.Problem((11 + i % 80, 23 + (7 * i) % 70, 35 + (3 * i) % 60)).question
                 for i in range(args.requests)]
    server = contextlib.nullcontext(args.url) if args.url else running_server(
        "--slots", str(args.slots), "--max-queue", str(max(args.requests, 1)))
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=TIMEOUT_S, max_retries=0)
        rows = {}
        for name, together in ((f"{args.requests} concurrent", True), ("one at a time", False)):
            run(client, args.model, questions, args.max_tokens, together)  # warm-up: compiles this mode's shapes
            rows[name] = run(client, args.model, questions, args.max_tokens, together)
    print(f"\n{args.requests} streaming chat requests x {args.max_tokens} tokens, demo model, "
          f"{args.slots} slots\n")
    print("| mode | wall s | requests/s | TTFT p50 s | TTFT p99 s | generated tokens/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['requests_per_s']:.2f} | {r['ttft_p50_s']:.3f} | "
              f"{r['ttft_p99_s']:.3f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
