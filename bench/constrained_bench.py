"""What a grammar-constrained request costs the unconstrained requests beside it on the engine.

A constrained row needs its next-token mask from the host before every step, so while one runs the engine
decodes one step per call instead of ``--decode-steps``. On the shipped demo model, ``--requests``
unconstrained requests generate ``--max-tokens`` tokens each (no stop token), once alone and once beside a
constrained request whose schema (a string of at least ``--max-tokens`` characters) keeps it running
throughout. Both runs are made once untimed first (compiling their programs), then ``--repeats`` times
timed; prints the median seconds and unconstrained tokens/s of each, and their ratio.

    python bench/constrained_bench.py [--requests 7] [--max-tokens 64] [--decode-steps 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

from zaya_jax import load
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.infer import Engine, constraints
from zaya_jax.infer.tokenizer import Tokenizer


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    config, params = load(DEFAULT_MODEL_DIR)
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    engine = Engine(params, config, slots=args.requests + 1, max_len=256, decode_steps=args.decode_steps)
    vocab = constraints.GrammarVocabulary(tok.tokenizer, config.vocab_size, config.eos_token_id)
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": args.max_tokens}},
              "required": ["text"]}
    grammar = vocab.compile({"type": "json_schema", "json_schema": {"name": "long", "schema": schema}})
    prompts = [tok.encode_chat([{"role": "user", "content": f"{10 + i}+{20 + i}"}]) for i in range(args.requests)]

    def run(constrained: bool) -> float:
        if constrained:
            engine.submit(prompts[0], max_new_tokens=4 * args.max_tokens, grammar=grammar, temperature=1.0)
        t0 = time.perf_counter()
        engine.generate(prompts, max_new_tokens=args.max_tokens, stop_token_ids=[], temperature=1.0)
        seconds = time.perf_counter() - t0
        while engine.busy:  # the constrained request's rest, untimed
            engine.step()
        return seconds

    results = {}
    for constrained in (False, True):
        run(constrained)  # compiles
        results[constrained] = statistics.median(run(constrained) for _ in range(args.repeats))
    tokens = args.requests * args.max_tokens
    for constrained, seconds in results.items():
        print(f"{'beside a constrained request' if constrained else 'alone':>28}: {seconds:.2f} s, "
              f"{tokens / seconds:.0f} unconstrained tokens/s")
    print(f"slowdown of the unconstrained requests: {results[True] / results[False]:.2f}x")


if __name__ == "__main__":
    main()
