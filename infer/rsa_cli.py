"""The ``zaya rsa`` command: Markov RSA over one prompt or a JSONL file of prompts."""

from __future__ import annotations

import json
import sys

from zaya_jax.cli import add_model_args, is_demo_model, resolve_model, seed_arg
from zaya_jax.demo import DEMO_POPULATION, DEMO_ROUNDS

# Zyphra's APEX settings (ZAYA1 report, Table XIII): rounds T, population N, tails C, budget beta, tail tau.
PRESETS = {
    "light": dict(rounds=2, population=16, tails=4, budget=8192, tail_tokens=4096),
    "high": dict(rounds=8, population=16, tails=4, budget=16384, tail_tokens=4096),
    "extra-high": dict(rounds=8, population=32, tails=4, budget=32768, tail_tokens=4096),
}
KNOBS = ("population", "tails", "rounds", "budget", "tail_tokens")
# The shipped demo model has a 1024-token context and was taught its own aggregation template: with no
# model given, `zaya rsa` runs the settings `zaya demo` measures (zaya_jax.demo.data) instead of APEX's.
DEMO_MODE = "demo"


def register(subparsers) -> None:
    p = subparsers.add_parser("rsa", help="Markov RSA: a population search with tail aggregation over rounds")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the question as text (needs the model's tokenizer)")
    source.add_argument("--prompt-ids", help="the question as comma-separated token ids")
    source.add_argument("--prompts-file", help='JSONL: one {"prompt": TEXT} or {"prompt_ids": [...]} per line')
    add_search_args(p)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--slots", type=int, default=None,
                   help="engine slots (default: problems x population, at most 64); problems interleave on them")
    p.add_argument("--json", action="store_true", help="print one JSON object with every round")
    p.set_defaults(func=_rsa_command)


def add_search_args(p) -> None:
    """Markov RSA's knobs: a ``--mode`` preset and the flags that override it."""
    p.add_argument("--mode", choices=sorted(PRESETS) + [DEMO_MODE],
                   help="preset: APEX settings of the ZAYA1 report, or the demo model's (its knobs and its aggregation "
                        "template: for models trained from it, e.g. by zaya rl); the flags below override the knobs "
                        "(default: demo for the shipped demo model, light otherwise)")
    p.add_argument("--population", type=int, help="N, candidates per round")
    p.add_argument("--tails", type=int, help="C, tails per aggregation prompt")
    p.add_argument("--rounds", type=int, help="T, aggregation rounds after the first generation")
    p.add_argument("--budget", type=int, help="beta, new tokens per candidate")
    p.add_argument("--tail-tokens", type=int, help="tau, tokens carried forward from each candidate")
    p.add_argument("--final-budget", type=int, help="new tokens per candidate in the last round (default: budget)")


def _demo_preset() -> dict:
    """What `zaya demo` runs: its N and T, and the C, tau and budget of the demo model's training data."""
    from zaya_jax.demo import data

    return dict(rounds=DEMO_ROUNDS, population=DEMO_POPULATION, tails=data.TAILS, budget=data.BUDGET,
                tail_tokens=data.TAIL_TOKENS)


def settings(args) -> dict:
    """The preset of ``--mode`` (default: demo for the demo model, else light) with the given flags on top."""
    mode = args.mode or (DEMO_MODE if is_demo_model(args.model) else "light")
    out = _demo_preset() if mode == DEMO_MODE else dict(PRESETS[mode])
    out.update({k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None})
    return out


def template_kind(model: str | None, requested: str | None = None) -> str:
    """The aggregation template: ``requested`` ("demo" or "default") if given, else ``"demo"`` (the one the
    demo model was taught) for the shipped demo model and ``"default"`` for any other ``model``."""
    return requested or ("demo" if is_demo_model(model) else "default")


def mode_template(args) -> str:
    """``zaya rsa`` / ``zaya eval``: ``--mode demo`` brings the demo's template (for a model trained from
    the demo model, e.g. by ``zaya rl``); otherwise as ``template_kind``."""
    return template_kind(args.model, DEMO_MODE if args.mode == DEMO_MODE else None)


def _rsa_command(args) -> int:
    from zaya_jax.demo import data
    from zaya_jax.jsonl import read_objects

    from .cli import check_line, load_tokenizer, single_line
    from .rsa import TokenTemplate, markov_rsa

    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    tokenizer = load_tokenizer(args.model, config)
    lines = read_objects(args.prompts_file, what="prompts") if args.prompts_file else [(0, single_line(args))]
    questions = []
    for n, line in lines:
        key = check_line(line, f"{args.prompts_file}:{n}", keys=("prompt", "prompt_ids"), knobs=())
        ids = line[key] if key == "prompt_ids" else tokenizer.encode(line[key], add_special_tokens=False)
        questions.append(list(ids))
    knobs = settings(args)
    template = TokenTemplate.from_tokenizer(data.TEMPLATE, knobs["tails"], tokenizer) if mode_template(args) == "demo" else None

    def progress(t, rnd):
        print(f"round {t}/{knobs['rounds']}: {rnd.generated_tokens} tokens generated, longest prompt "
              f"{rnd.longest_prompt}, {rnd.seconds:.1f} s", file=sys.stderr, flush=True)

    def problem_done(p, res):  # problems interleave on the engine: each is reported as it finishes
        answer, share = res.majority[0]
        print(f"problem {p}: majority answer {answer!r} ({share:.0%} of {knobs['population']} candidates)", flush=True)

    result = markov_rsa(params, config, questions, **knobs, final_budget=args.final_budget,
                        temperature=args.temperature, top_p=args.top_p, seed=args.seed, template=template,
                        tokenizer=tokenizer, progress=progress, slots=args.slots,
                        on_problem=None if args.json else problem_done)
    if args.json:
        print(json.dumps({
            "model": desc, "settings": dict(knobs, final_budget=args.final_budget or knobs["budget"]),
            "generated_tokens": result.generated_tokens,
            "problems": [{
                "answers": result.answers[p], "majority": result.majority[p][0], "majority_share": result.majority[p][1],
                "final_texts": result.texts[p],
                "rounds": [{"candidates": r.candidates[p], "stop_reasons": r.stop_reasons[p], "tails": r.tails[p],
                            "subsets": None if r.subsets is None else r.subsets[p],
                            "longest_prompt": max(len(m) for m in r.prompts[p]), "generated_tokens":
                            sum(len(c) for c in r.candidates[p])} for r in result.rounds],
            } for p in range(len(questions))],
        }))
    else:
        print(f"generated tokens: {result.generated_tokens} "
              f"({', '.join(str(r.generated_tokens) for r in result.rounds)} per round)")
    return 0
