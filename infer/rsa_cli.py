"""The ``zaya rsa`` command: Markov RSA over one prompt or a JSONL file of prompts."""

from __future__ import annotations

import json
import sys

from zaya_jax.cli import add_model_args, resolve_model, seed_arg

from .rsa_config import KNOBS, MODES, RSAConfig, field_help, field_type
from .rsa_modes import mode_template, search_config

PRESET_FLAGS = KNOBS + ("final_budget", "temperature", "top_p")  # each overrides its preset's value


def register(subparsers) -> None:
    p = subparsers.add_parser("rsa", help="Markov RSA: a population search with tail aggregation over rounds")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the question as text (needs the model's tokenizer)")
    source.add_argument("--prompt-ids", help="the question as comma-separated token ids")
    source.add_argument("--prompts-file", help='JSONL: one {"prompt": TEXT} or {"prompt_ids": [...]} per line')
    add_search_args(p)
    p.add_argument("--slots", type=int, default=None,
                   help="engine slots (default: problems x population, at most 64); problems interleave on them")
    p.add_argument("--json", action="store_true", help="print one JSON object with every round")
    p.set_defaults(func=_rsa_command)


def add_search_args(p) -> None:
    """Markov RSA's settings (``RSAConfig``'s fields): a ``--mode`` preset, the flags that override it, and
    ``--seed``. Help and defaults are the dataclass's."""
    p.add_argument("--mode", choices=list(MODES),
                   help="preset: APEX settings of the ZAYA1 report, or the demo model's (its knobs and its aggregation "
                        "template: for models trained from it, e.g. by zaya rl); the flags below override it "
                        "(default: demo for the shipped demo model, light otherwise)")
    for name in PRESET_FLAGS:
        p.add_argument(f"--{name.replace('_', '-')}", type=field_type(name),
                       help=f"{field_help(name)} (default: the preset's)")
    p.add_argument("--seed", type=seed_arg, default=RSAConfig.seed, help=f"{field_help('seed')} (default %(default)s)")


def config_from_args(args) -> RSAConfig:
    """The preset of ``--mode`` (default: demo for the demo model, else light) with the given flags on top."""
    return search_config(args.model, args.mode, seed=args.seed, **{k: getattr(args, k) for k in PRESET_FLAGS})


def _rsa_command(args) -> int:
    from zaya_jax.jsonl import read_objects

    from .cli import check_line, load_tokenizer, single_line
    from .rsa import markov_rsa
    from .rsa_modes import token_template

    rsa = config_from_args(args)
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    tokenizer = load_tokenizer(args.model, config)
    lines = read_objects(args.prompts_file, what="prompts") if args.prompts_file else [(0, single_line(args))]
    questions = []
    for n, line in lines:
        key = check_line(line, f"{args.prompts_file}:{n}", keys=("prompt", "prompt_ids"), knobs=())
        ids = line[key] if key == "prompt_ids" else tokenizer.encode(line[key], add_special_tokens=False)
        questions.append(list(ids))
    template = token_template(mode_template(args.model, args.mode), rsa.tails, tokenizer)

    def progress(t, rnd):
        print(f"round {t}/{rsa.rounds}: {rnd.generated_tokens} tokens generated, longest prompt "
              f"{rnd.longest_prompt}, {rnd.seconds:.1f} s", file=sys.stderr, flush=True)

    def problem_done(p, res):  # problems interleave on the engine: each is reported as it finishes
        answer, share = res.majority[0]
        print(f"problem {p}: majority answer {answer!r} ({share:.0%} of {rsa.population} candidates)", flush=True)

    result = markov_rsa(params, config, questions, rsa, template=template, tokenizer=tokenizer, progress=progress,
                        slots=args.slots, on_problem=None if args.json else problem_done)
    if args.json:
        print(json.dumps({
            "model": desc, "settings": dict(rsa.knobs, final_budget=rsa.round_budget(rsa.rounds)),
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
