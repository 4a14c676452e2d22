"""The engine at dataset scale: throughput and slot utilisation against static batches, cost against
max_len, the prefix cache's time to first token, memory against workload size, and Markov RSA over
many problems.

    python bench/engine_bench.py throughput [--repeats 3] [--prompts 256] [--slots 16]  # bench-124M float32
    python bench/engine_bench.py sweep [--repeats 3]        # the same engine at max_len 512 .. 8192
    python bench/engine_bench.py ttft [--repeats 3]         # a 1,024-token prefix cached vs not
    python bench/engine_bench.py rss                         # peak RSS, 1,000 vs 10,000 prompts (demo model)
    python bench/engine_bench.py rsa [--slots 128]           # Markov RSA, 64 demo problems, N=16, T=2

throughput: prompts of 16-128 tokens, max_new_tokens uniform in 8..256 (no stop tokens), on the engine
with its defaults (64 slots; ``--slots``: another count; max_len the context, 8,192) against ``generate``
over consecutive chunks of 16 (static batches: a chunk runs until its longest request ends; ``generate``
fits max_len to the chunk). New tokens/s as medians over repeats after a warm-up, and slot utilisation =
real new tokens / (slots x decode steps run). sweep: 32 prompts of 16-128 tokens, 8-128 new tokens,
16 slots, the same workload at each max_len, runs alternating; new tokens per second of wall time and
per CPU second of the process, each relative to max_len 512. ttft: one request of a 1,024-token prefix and 32 tokens of
its own, max_new_tokens 1, on an engine whose prefix cache holds the prefix (an earlier request's)
against one without a prefix cache; runs alternate. rss: ``zaya generate --prompts-file`` in a fresh
process per size, peak RSS (VmHWM). rsa: generated tokens/s and accuracy with the prefix cache on and
off (runs alternating), the share of prompt tokens (round 0's questions and the aggregation prompts)
served from it, and that of the aggregation prompts alone; ``--slots`` is passed only when given, so
the same script measures a checkout whose markov_rsa has no engine (the lockstep baseline).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np


def bench_model(context: int = 8192):
    import zaya_jax
    from zaya_jax.bench_configs import CONFIGS

    config = zaya_jax.ZayaConfig(**CONFIGS["bench-124M"], eos_token_id=(), max_position_embeddings=context)
    return config, zaya_jax.init(config, jax.random.key(0))


def throughput(repeats: int, count: int, engine_slots: int | None) -> None:
    from zaya_jax.infer import Engine, generate

    config, params = bench_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, config.vocab_size, rng.integers(16, 129)).tolist() for _ in range(count)]
    max_new = rng.integers(8, 257, count).tolist()
    slots = 16

    def engine_run():
        engine = Engine(params, config, **({} if engine_slots is None else {"slots": engine_slots}))
        out = engine.generate(prompts, max_new_tokens=max_new)
        return out, engine.stats()["slot_utilisation"], engine.slots

    def static_run():
        tokens, steps = [], 0
        for i in range(0, len(prompts), slots):
            out = generate(params, config, prompts[i:i + slots], max_new_tokens=max_new[i:i + slots])
            tokens += out.tokens
            steps += max(len(t) for t in out.tokens) - 1  # decode steps: the first token comes from the prefill
        useful = sum(len(t) - 1 for t in tokens)
        return tokens, useful / (slots * steps)

    engine_out, engine_util, pool_slots = engine_run()  # warm-up: compiles
    static_tokens, static_util = static_run()
    agree = np.mean([a == b for a, b in zip(engine_out.tokens, static_tokens)])
    total = sum(len(t) for t in static_tokens)
    rates = {"engine": [], "static": []}
    for _ in range(repeats):  # alternate, so both see the same machine state
        for name, fn in (("engine", engine_run), ("static", static_run)):
            t = time.perf_counter()
            fn()
            rates[name].append(total / (time.perf_counter() - t))
    engine_rate, static_rate = statistics.median(rates["engine"]), statistics.median(rates["static"])
    print(f"bench-124M float32, {count} prompts (16-128 tokens), max_new_tokens 8..256, chunks of {slots}, "
          f"engine {pool_slots} slots, max_len {config.max_position_embeddings}, {jax.device_count()} device(s), "
          f"median of {repeats}")
    print("| | new tokens/s | slot utilisation |")
    print("| --- | ---: | ---: |")
    print(f"| generate, static chunks of {slots} | {static_rate:,.0f} | {static_util:.0%} |")
    print(f"| Engine, {pool_slots} slots, default max_len | {engine_rate:,.0f} | {engine_util:.0%} |")
    print(f"| ratio | {engine_rate / static_rate:.2f}x | |")
    print(f"requests whose greedy tokens are identical in both: {agree:.0%}")


def sweep(repeats: int) -> None:
    from zaya_jax.infer import Engine

    config, params = bench_model()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, config.vocab_size, rng.integers(16, 129)).tolist() for _ in range(32)]
    max_new = rng.integers(8, 129, 32).tolist()
    lengths = (512, 1024, 2048, 4096, 8192)

    def run(max_len):  # a fresh engine each time: the same work every run
        engine = Engine(params, config, slots=16, max_len=max_len)
        t, cpu = time.perf_counter(), process_seconds()
        out = engine.generate(prompts, max_new_tokens=max_new)
        tokens = sum(len(t) for t in out.tokens)
        return tokens / (time.perf_counter() - t), tokens / (process_seconds() - cpu)

    for n in lengths:
        run(n)  # warm-up: compiles
    rates = {n: [] for n in lengths}
    for _ in range(repeats):  # alternate, so every max_len sees the same machine state
        for n in lengths:
            rates[n].append(run(n))
    print(f"bench-124M float32, 32 prompts (16-128 tokens), 8-128 new tokens, 16 slots, median of {repeats}")
    print("| max_len | new tokens/s | vs 512 | new tokens per CPU second | vs 512 |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    wall, cpu = ({n: statistics.median(r[i] for r in rates[n]) for n in lengths} for i in (0, 1))
    for n in lengths:
        print(f"| {n:,} | {wall[n]:,.0f} | {wall[n] / wall[512]:.2f}x | {cpu[n]:,.1f} | {cpu[n] / cpu[512]:.2f}x |")


def process_seconds() -> float:
    """CPU seconds this process has used (all its threads): on a shared host, less sensitive to the
    other jobs' load than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ttft(repeats: int) -> None:
    from zaya_jax.infer import Engine

    config, params = bench_model()
    rng = np.random.default_rng(0)
    prefix = rng.integers(10, config.vocab_size, 1024).tolist()
    tail = lambda: rng.integers(10, config.vocab_size, 32).tolist()  # noqa: E731
    cached = Engine(params, config, slots=16, max_len=2048)
    plain = Engine(params, config, slots=16, max_len=2048, prefix_cache=False)
    for engine in (cached, plain):  # warm-up: compiles; the cached engine now holds the prefix
        engine.generate([prefix + tail()], max_new_tokens=1)
        engine.generate([prefix + tail()], max_new_tokens=1)
    times = {"cached": [], "plain": []}
    for _ in range(repeats):
        for name, engine in (("cached", cached), ("plain", plain)):
            prompt = prefix + tail()
            t = time.perf_counter()
            engine.generate([prompt], max_new_tokens=1)
            times[name].append(time.perf_counter() - t)
    assert cached.stats()["prefix_hits"] >= repeats
    c, p = statistics.median(times["cached"]), statistics.median(times["plain"])
    print(f"bench-124M float32, a 1,024-token prefix + 32 tokens, first token, median of {repeats}")
    print("| | time to first token |")
    print("| --- | ---: |")
    print(f"| prefix not cached | {p * 1e3:,.0f} ms |")
    print(f"| prefix cached | {c * 1e3:,.0f} ms |")
    print(f"| ratio | {c / p:.2f}x |")


def rss() -> None:
    from zaya_jax.demo import DEFAULT_MODEL_DIR

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for count in (1000, 10000):
            path = os.path.join(tmp, f"p{count}.jsonl")
            with open(path, "w") as f:
                for _ in range(count):
                    f.write(json.dumps({"prompt_ids": rng.integers(3, 100, rng.integers(8, 40)).tolist()}) + "\n")
            code = ("import sys, runpy; from zaya_jax.memory import peak_rss_bytes; sys.argv = sys.argv[1:]; "
                    "exec('try:\\n runpy.run_module(\"zaya_jax.cli\", run_name=\"__main__\")\\nexcept SystemExit: pass');"
                    "print('PEAK', peak_rss_bytes(), file=sys.stderr)")
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", code, "zaya", "generate", DEFAULT_MODEL_DIR, "--prompts-file",
                                   path, "--max-new-tokens", "8", "--slots", "64", "--out", os.path.join(tmp, "o.jsonl"),
                                   "--force", "--no-progress"], capture_output=True, text=True, check=True)
            peak = int(proc.stderr.split("PEAK")[-1].split()[0])
            rows.append((count, peak, time.perf_counter() - t))
    print("| prompts | peak RSS | seconds |")
    print("| ---: | ---: | ---: |")
    for count, peak, seconds in rows:
        print(f"| {count:,} | {peak / 2**20:,.0f} MiB | {seconds:.0f} |")
    print(f"10,000 / 1,000 peak RSS: {rows[1][1] / rows[0][1]:.3f}")


def rsa(slots: int | None, problems: int, repeats: int) -> None:
    from zaya_jax import load
    from zaya_jax.demo import DEFAULT_MODEL_DIR, DEMO_POPULATION, DEMO_ROUNDS, DEMO_TEMPERATURE, arith, data
    from zaya_jax.infer import Engine
    from zaya_jax.infer.rsa import TokenTemplate, extract_boxed, markov_rsa
    from zaya_jax.infer.scheduler import PREFIX_BLOCK
    from zaya_jax.infer.tokenizer import Tokenizer

    config, params = load(DEFAULT_MODEL_DIR)
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    held = arith.problems("test", problems)
    questions = [tokenizer.encode(p.question, add_special_tokens=False) for p in held]
    template = TokenTemplate.from_tokenizer(data.TEMPLATE, data.TAILS, tokenizer)
    extra = {} if slots is None else {"slots": slots}
    rows = min(1 << (problems * DEMO_POPULATION - 1).bit_length(), 64) if slots is None else slots

    def run(seed, **engine):
        if engine:  # an engine of markov_rsa's default size, with the prefix cache on or off
            extra["engine"] = Engine(params, config, slots=rows, **engine)
        result = markov_rsa(params, config, questions, population=DEMO_POPULATION, tails=data.TAILS,
                            rounds=DEMO_ROUNDS, budget=data.BUDGET, tail_tokens=data.TAIL_TOKENS,
                            temperature=DEMO_TEMPERATURE, seed=seed, template=template, tokenizer=tokenizer, **extra)
        return result, extra.get("engine")

    if hasattr(Engine, "stats"):  # a checkout with the prefix cache: on against off, runs alternating
        for on in (False, True):  # warm-up: compiles (with it, also the smaller chunks and the load / save)
            run(0, prefix_cache=on)
        rates = {False: [], True: []}
        for _ in range(repeats):
            for on in (False, True):
                t = time.perf_counter()
                result, engine = run(1, prefix_cache=on)
                seconds = time.perf_counter() - t
                rates[on].append(result.generated_tokens / seconds)
        on, off = statistics.median(rates[True]), statistics.median(rates[False])
        stats = engine.stats()
        print(f"prefix cache on: {on:,.0f} generated tokens/s, off: {off:,.0f} ({on / off:.2f}x, median of "
              f"{repeats}); {stats['prefix_tokens'] / stats['prompt_tokens']:.1%} of {stats['prompt_tokens']:,} "
              f"prompt tokens served from it ({stats['prefix_hits']:,} of {stats['prefill_rows']:,} prefills "
              "started there)")
        if max(map(len, questions)) <= PREFIX_BLOCK:  # round 0 cannot load a block: the hits are aggregation's
            aggregation = stats["prompt_tokens"] - sum(len(m) for row in result.rounds[0].prompts for m in row)
            print(f"aggregation prompts: {stats['prefix_tokens'] / aggregation:.1%} of their {aggregation:,} tokens "
                  "served from the prefix cache")
    else:
        run(0)  # warm-up: compiles
        t = time.perf_counter()
        result, _ = run(1)
        seconds = time.perf_counter() - t
    first = np.mean([extract_boxed(tokenizer.decode(c)) == p.answer for p, row in zip(held, result.rounds[0].candidates)
                     for c in row])
    last = np.mean([a == p.answer for p, row in zip(held, result.answers) for a in row])
    print(f"Markov RSA, {problems} demo problems, N={DEMO_POPULATION} C={data.TAILS} T={DEMO_ROUNDS}, "
          f"slots={slots or 'default'}: {result.generated_tokens / seconds:,.0f} generated tokens/s "
          f"({result.generated_tokens} tokens in {seconds:.1f} s); round 0 mean accuracy {first:.1%}, "
          f"round {DEMO_ROUNDS} mean accuracy {last:.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=("throughput", "sweep", "ttft", "rss", "rsa"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slots", type=int, default=None,
                        help="engine slots (default: the engine's own, 64; rsa: not passed)")
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=256, help="throughput: prompts")
    args = parser.parse_args()
    if args.part == "throughput":
        throughput(args.repeats, args.prompts, args.slots)
    elif args.part == "sweep":
        sweep(args.repeats)
    elif args.part == "ttft":
        ttft(args.repeats)
    elif args.part == "rss":
        rss()
    else:
        rsa(args.slots, args.problems, args.repeats)


if __name__ == "__main__":
    main()
