"""The ``zaya demo`` command: ``zaya eval`` on the built-in held-out arithmetic problems, as a table."""

from __future__ import annotations

import json
import os

from . import DEFAULT_MODEL_DIR, arith

SOURCE = "held-out arithmetic problem"  # what errors call a problem's position (there is no file)


def register(subparsers) -> None:
    from zaya_jax.cli import add_model_arg, seed_arg
    from zaya_jax.infer.eval_cli import add_output_args
    from zaya_jax.infer.rsa_config import RSAConfig, field_help

    preset = RSAConfig.demo()
    p = subparsers.add_parser("demo", help="the trained demo model: single samples vs majority vote vs Markov RSA "
                                           "(zaya eval on held-out arithmetic problems)")
    add_model_arg(p, DEFAULT_MODEL_DIR, former_option=True)
    p.add_argument("--problems", type=int, default=64, help="held-out problems to solve (default 64)")
    for name, kind in (("population", int), ("tails", int), ("rounds", int), ("tail_tokens", int),
                       ("temperature", float)):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(preset, name),
                       help=f"{field_help(name)} (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=preset.seed, help="the search's seed (default %(default)s)")
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
    from zaya_jax.infer.rsa_config import RSAConfig

    path = args.model
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"no demo model at {path}; build one as docs/demo_model.md says")
    if args.problems < 1:
        raise ValueError(f"--problems must be positive, got {args.problems}")
    rsa = RSAConfig.demo(population=args.population, tails=args.tails, rounds=args.rounds,
                         tail_tokens=args.tail_tokens, temperature=args.temperature, seed=args.seed)
    config, params, desc = resolve_model(path)
    settings = run_settings(rsa, model=model_setting(path, desc), data=f"arith test split, first {args.problems}",
                            grader="math", template="demo")
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
