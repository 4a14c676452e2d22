"""What log-probs cost the engine's decode: a decode call (``--steps`` steps of ``--slots`` running slots)
with every request asking ``logprobs=20`` against the same call with none asking.

    python bench/logprobs_bench.py [--slots 16] [--steps 8] [--repeats 5] [--vocab 32000,262272]

The model is bench-124M (8 layers, D = 512, random weights, float32) at each ``--vocab`` size (262,272 is
ZAYA1-8B's). Two engines of the same params, each with all slots running (no stop tokens): in one no
request asks log-probs (the compiled step skips them and nothing is transferred), in the other every one
asks the top 20. ``Engine.step()`` times (device work, the log-probs' transfer and their host entries)
alternate between the two after a warm-up; medians over ``--repeats``, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np


def measure(vocab: int, slots: int, steps: int, repeats: int) -> dict:
    import zaya_jax
    from zaya_jax.bench_configs import CONFIGS
    from zaya_jax.infer import Engine

    config = zaya_jax.ZayaConfig(**{**CONFIGS["bench-124M"], "vocab_size": vocab}, eos_token_id=(),
                                 max_position_embeddings=1024)
    params = zaya_jax.init(config, jax.random.key(0))
    prompts = np.random.default_rng(0).integers(10, vocab, (slots, 32)).tolist()
    engines = {}
    for name, logprobs in (("plain", None), ("logprobs", 20)):
        engine = Engine(params, config, slots=slots, max_len=1024, decode_steps=steps)
        for p in prompts:
            engine.submit(p, max_new_tokens=1000, logprobs=logprobs)
        engine.step()  # prefill, insert and a first decode call (compiles)
        engine.step()
        engines[name] = engine
    times = {name: [] for name in engines}
    for _ in range(repeats):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            engine.step()
            times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {"vocab": vocab, "slots": slots, "steps": steps, "plain_ms": round(ms["plain"], 2),
            "logprobs_ms": round(ms["logprobs"], 2), "ratio": round(ms["logprobs"] / ms["plain"], 3)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--vocab", default="32000,262272", help="comma-separated vocabulary sizes")
    args = p.parse_args(argv)
    for vocab in map(int, args.vocab.split(",")):
        print(json.dumps(measure(vocab, args.slots, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
