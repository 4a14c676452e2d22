"""Markov RSA throughput against plain batched generation on bench-124M, and its compile count.

    python bench/rsa_bench.py [--rounds 2] [--repeats 3]

A population of 16 (C=4) runs T rounds on one random-weight bench-124M model (no stop tokens, so
every candidate generates the full budget); generated tokens/s over the whole search are compared
with ``generate`` at batch 16 on prompts as long as the aggregation prompts, same budget, same
machine, same run. Medians over repeats after a warm-up run. Compilations are counted as the traces of
the inference programs (``decode.TRACES``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import zaya_jax
from zaya_jax.bench_configs import CONFIGS
from zaya_jax.infer import decode, generation, rsa

BENCH_124M = zaya_jax.ZayaConfig(**CONFIGS["bench-124M"], eos_token_id=())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--tail-tokens", type=int, default=32)
    args = parser.parse_args()
    N, C = 16, 4
    params = zaya_jax.init(BENCH_124M, jax.random.key(0))
    rng = np.random.default_rng(0)
    question = rng.integers(10, 32000, 48).tolist()
    piece = lambda n: tuple(rng.integers(10, 32000, n).tolist())  # noqa: E731
    template = rsa.TokenTemplate(piece(4), piece(3), piece(12), piece(6), tuple(piece(4) for _ in range(C)), piece(1),
                                 piece(10))
    run = lambda seed: rsa.markov_rsa(params, BENCH_124M, question, population=N, tails=C, rounds=args.rounds,  # noqa: E731
                                      budget=args.budget, tail_tokens=args.tail_tokens, template=template, seed=seed)
    before = sum(decode.TRACES.values())
    first = run(0)
    compiles = sum(decode.TRACES.values()) - before
    agg_len = first.rounds[-1].longest_prompt
    prompts = [rng.integers(10, 32000, agg_len).tolist() for _ in range(N)]
    generate = lambda seed: generation.generate(params, BENCH_124M, prompts, max_new_tokens=args.budget,  # noqa: E731
                                                temperature=1.0, seed=seed)
    generate(0)
    rsa_rates, gen_rates = [], []
    for r in range(args.repeats):  # alternate, so both see the same machine state
        t = time.perf_counter()
        result = run(r + 1)
        rsa_rates.append(result.generated_tokens / (time.perf_counter() - t))
        t = time.perf_counter()
        out = generate(r + 1)
        gen_rates.append(sum(len(x) for x in out.tokens) / (time.perf_counter() - t))
    rsa_rate, gen_rate = statistics.median(rsa_rates), statistics.median(gen_rates)
    print(f"Markov RSA N={N} C={C} T={args.rounds} budget={args.budget} tau={args.tail_tokens}: "
          f"{rsa_rate:.0f} generated tokens/s (all {args.rounds + 1} rounds, host work included)")
    print(f"generate batch {N}, {agg_len}-token prompts, {args.budget} new tokens: {gen_rate:.0f} tokens/s")
    print(f"ratio RSA / generate: {rsa_rate / gen_rate:.2f} (target >= 0.8)")
    print(f"compilations for the first {args.rounds}-round run: {compiles} "
          f"(prefill and insert programs per prompt bucket and group size, the aggregation program, one decode program)")


if __name__ == "__main__":
    main()
