"""The ``zaya demo`` command: batched generation and Markov RSA on held-out problems, as a table."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from . import DEFAULT_MODEL_DIR, DEMO_POPULATION, DEMO_ROUNDS, DEMO_TEMPERATURE, arith, data


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the trained demo model: single samples vs majority vote vs Markov RSA")
    p.add_argument("--model", default=None, help="model directory (default: the demo model shipped in the package)")
    p.add_argument("--problems", type=int, default=64, help="held-out problems to solve (default 64)")
    p.add_argument("--population", type=int, default=DEMO_POPULATION, help=f"N (default {DEMO_POPULATION})")
    p.add_argument("--tails", type=int, default=data.TAILS, help=f"C (default {data.TAILS})")
    p.add_argument("--rounds", type=int, default=DEMO_ROUNDS, help=f"T aggregation rounds (default {DEMO_ROUNDS})")
    p.add_argument("--temperature", type=float, default=DEMO_TEMPERATURE,
                   help=f"sampling temperature of every round (default {DEMO_TEMPERATURE})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_demo_command)


def _demo_command(args) -> int:
    import zaya_jax
    from zaya_jax.infer.tokenizer import Tokenizer

    from .evaluate import evaluate, format_table

    path = args.model or DEFAULT_MODEL_DIR
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no demo model at {path}; build one as docs/demo_model.md says")
    if args.problems < 1:
        raise ValueError(f"--problems must be positive, got {args.problems}")
    config, params = zaya_jax.load(path)
    tokenizer = Tokenizer.from_dir(path)
    problems = arith.problems("test", args.problems)

    def progress(t, rnd):
        print(f"round {t}/{args.rounds}: {rnd.generated_tokens} tokens, {rnd.seconds:.1f} s", file=sys.stderr, flush=True)

    rows, info = evaluate(params, config, tokenizer, problems, population=args.population, tails=args.tails,
                          rounds=args.rounds, temperature=args.temperature, seed=args.seed, progress=progress)
    if args.json:
        print(json.dumps({"model": path, **info, "rows": [dataclasses.asdict(r) for r in rows]}))
    else:
        print(f"model: {path}")
        print(f"task: multi-term addition, step by step, answer in \\boxed{{}}; temperature {args.temperature}")
        print(format_table(rows, info))
    return 0
