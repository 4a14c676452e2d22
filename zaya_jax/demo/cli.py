"""The ``zaya demo`` command: ``zaya eval`` on the built-in held-out arithmetic problems, as a table."""

from __future__ import annotations

import json
import os

from . import DEFAULT_MODEL_DIR, DEMO_POPULATION, DEMO_ROUNDS, DEMO_TEMPERATURE, arith, data

SOURCE = "held-out arithmetic problem"  # what errors call a problem's position (there is no file)


def register(subparsers) -> None:
    from zaya_jax.cli import add_model_arg, seed_arg
    from zaya_jax.infer.eval_cli import add_output_args

    p = subparsers.add_parser("demo", help="the trained demo model: single samples vs majority vote vs Markov RSA "
                                           "(zaya eval on held-out arithmetic problems)")
    add_model_arg(p, DEFAULT_MODEL_DIR, former_option=True)
    p.add_argument("--problems", type=int, default=64, help="held-out problems to solve (default 64)")
    p.add_argument("--population", type=int, default=DEMO_POPULATION, help=f"N (default {DEMO_POPULATION})")
    p.add_argument("--tails", type=int, default=data.TAILS, help=f"C (default {data.TAILS})")
    p.add_argument("--rounds", type=int, default=DEMO_ROUNDS, help=f"T aggregation rounds (default {DEMO_ROUNDS})")
    p.add_argument("--tail-tokens", type=int, default=data.TAIL_TOKENS,
                   help=f"tau, the last tokens of each candidate an aggregation prompt shows (default {data.TAIL_TOKENS}; "
                        f"{data.BUDGET}: whole solutions)")
    p.add_argument("--temperature", type=float, default=DEMO_TEMPERATURE,
                   help=f"sampling temperature of every round (default {DEMO_TEMPERATURE})")
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_output_args(p, required=False)
    p.set_defaults(func=_demo_command)


def heldout_problems(count: int) -> list:
    """The first ``count`` held-out problems as ``zaya eval`` problems (id ``test-i``)."""
    from zaya_jax.infer.evaluate import Problem

    return [Problem(i, f"test-{i}", p.question, p.answer, i + 1) for i, p in enumerate(arith.problems("test", count))]


def _demo_command(args) -> int:
    from zaya_jax.cli import model_setting, resolve_model
    from zaya_jax.infer.eval_cli import run, run_settings

    path = args.model
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no demo model at {path}; build one as docs/demo_model.md says")
    if args.problems < 1:
        raise ValueError(f"--problems must be positive, got {args.problems}")
    config, params, desc = resolve_model(path)
    knobs = dict(population=args.population, tails=args.tails, rounds=args.rounds, budget=data.BUDGET,
                 tail_tokens=args.tail_tokens)
    settings = run_settings(knobs, model=model_setting(path, desc), data=f"arith test split, first {args.problems}",
                            temperature=args.temperature, top_p=1.0, seed=args.seed, grader="math", template="demo")
    summary, table = run(params, config, path, heldout_problems(args.problems), settings, source=SOURCE,
                         out=args.out, resume=args.resume, force=args.force, slots=args.slots,
                         save_texts=args.save_texts, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, sort_keys=True))
    else:
        print(f"model: {path}")
        print(f"task: multi-term addition, step by step, answer in \\boxed{{}}; temperature {args.temperature}")
        print(table)
    return 0
