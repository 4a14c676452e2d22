"""The ``zaya eval`` command: benchmark accuracy with Markov RSA over a JSONL dataset, resumable.

``run`` is the driver ``zaya demo`` shares: it sends the problems not yet done to ``markov_rsa`` and
writes each problem's record as ``on_problem`` hands it over; the summary comes from the records.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from zaya_jax.cli import add_model_args, model_setting, resolve_model, seed_arg

from .rsa_cli import add_search_args, mode_template
from .rsa_cli import settings as preset_settings

KNOBS = ("population", "tails", "rounds", "budget", "tail_tokens", "final_budget")


def add_output_args(p, *, required: bool) -> None:
    p.add_argument("--out", required=required, help="run directory: results.jsonl, summary.json, summary.md, "
                                                     "accuracy.png")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue the run in --out: skip the problems already "
                                                             "in its results.jsonl (same settings only)")
    again.add_argument("--force", action="store_true", help="start over in a non-empty --out (replaces only the "
                                                            "files zaya eval writes)")
    p.add_argument("--save-texts", action="store_true", help="also keep every candidate's full text in results.jsonl")
    p.add_argument("--slots", type=int, help="rows of the engine's slot pool (default: the engine's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="benchmark accuracy with Markov RSA (pass@1, majority vote, every round) over a JSONL file",
        description='Scores a model on a JSONL file of {"question" | "problem" | "prompt": ..., "answer": ..., '
                    '"id": ...} lines with Markov RSA: pass@1 and majority@N of round 0, then the mean accuracy and '
                    'majority vote of each aggregation round, against tokens generated. Candidates are graded on '
                    'their last \\boxed{} with math-verify (or --grader exact).')
    add_model_args(p)
    p.add_argument("--data", required=True, help="JSONL file of problems")
    add_output_args(p, required=True)
    add_search_args(p)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=seed_arg, default=0)
    p.add_argument("--limit", type=int, help="only the first LIMIT problems")
    p.add_argument("--grader", choices=("math", "exact"), default="math",
                   help="math: math-verify equivalence (default); exact: string equality")
    p.add_argument("--prompt-template", help="text around each question, e.g. $'{question}\\nPut the final answer "
                                             "in \\\\boxed{}.' (default: the question alone)")
    p.set_defaults(func=_eval_command)


def run_settings(knobs: dict, *, model: str, data: str, temperature: float, top_p: float, seed: int, grader: str,
                 template: str, prompt_template: str | None = None, limit: int | None = None) -> dict:
    """Everything the scores depend on: what run.json records and ``--resume`` compares."""
    final_budget = knobs.get("final_budget")
    knobs = dict(knobs, final_budget=knobs["budget"] if final_budget is None else final_budget)
    return dict(knobs, model=model, data=data, temperature=temperature, top_p=top_p, seed=seed, grader=grader,
                aggregation_template=template, prompt_template=prompt_template, limit=limit)


def _eval_command(args) -> int:
    from .evaluate import read_dataset

    problems = read_dataset(args.data, args.limit)
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    knobs = dict(preset_settings(args), final_budget=args.final_budget)
    with open(args.data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    settings = run_settings(knobs, model=model_setting(args.model, desc), data=f"{os.path.basename(args.data)} sha256:{digest}",
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, grader=args.grader,
                            template=mode_template(args),
                            prompt_template=args.prompt_template, limit=args.limit)
    _, table = run(params, config, args.model, problems, settings, source=args.data, out=args.out,
                   inputs={"--data": args.data}, resume=args.resume, force=args.force, slots=args.slots, save_texts=args.save_texts,
                   progress=not args.no_progress)
    print(table)
    return 0


def token_template(kind: str, tails: int, tokenizer):
    """The run's ``rsa.TokenTemplate``: the demo model's own aggregation template (``kind`` "demo") or
    the default one, inside ``tokenizer``'s chat template."""
    from zaya_jax.demo import data as demo_data

    from .rsa import AggregationTemplate, TokenTemplate

    text_template = demo_data.TEMPLATE if kind == "demo" else AggregationTemplate.default(tails)
    return TokenTemplate.from_tokenizer(text_template, tails, tokenizer)


def run(params, config, model_dir: str, problems, settings: dict, *, source: str, out: str | None = None,
        inputs: dict[str, str] | None = None, resume: bool = False, force: bool = False, slots: int | None = None,
        save_texts: bool = False, progress: bool = True):
    """Evaluates ``problems`` (``evaluate.Problem``) under ``settings`` (``run_settings``); with ``out``, in
    that run directory, none of whose files may be one of ``inputs`` (a name -> the file the problems were
    read from); ``progress``: a tqdm bar on stderr. Returns (summary, table)."""
    from tqdm import tqdm

    from .eval_output import RunDir
    from .evaluate import Grader, apply_prompt_template, check_context, format_table, score_problem, summarize
    from .rsa import check_search, markov_rsa
    from .tokenizer import Tokenizer

    grader = Grader(settings["grader"])
    tokenizer = Tokenizer.from_dir(model_dir)
    template = token_template(settings["aggregation_template"], settings["tails"], tokenizer)
    ids = []
    for p in problems:
        text = apply_prompt_template(settings["prompt_template"], p.question)
        try:
            ids.append(tokenizer.encode(text, add_special_tokens=False, max_tokens=config.max_position_embeddings))
        except ValueError as e:
            raise ValueError(f"{source}:{p.line}: {e}") from None
    # Every setting is checked before the run directory is touched: a refused run leaves nothing behind.
    check_search(config, ids, **{k: settings[k] for k in KNOBS}, temperature=settings["temperature"],
                 top_p=settings["top_p"])
    if slots is not None and (not isinstance(slots, int) or slots < 1):
        raise ValueError(f"--slots must be a positive integer, got {slots!r}")
    check_context(problems, ids, template, settings, config.max_position_embeddings, source)
    run_dir = RunDir(out, settings, resume=resume, force=force, inputs=inputs) if out else None
    records = dict(run_dir.records) if run_dir else {}
    todo = [i for i, p in enumerate(problems) if p.index not in records]

    start, spent = time.perf_counter(), 0
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), unit="problem", file=sys.stderr,
               dynamic_ncols=True, disable=not progress)

    def on_problem(j, result):
        nonlocal spent
        record = score_problem(problems[todo[j]], result, grader, tokenizer.decode, save_texts=save_texts)
        records[record["index"]] = record
        if run_dir:
            run_dir.append(record)
        spent += record["tokens"]
        last = [r["rounds"][-1]["correct"] for r in records.values()]
        bar.set_postfix(accuracy=f"{sum(map(sum, last)) / sum(map(len, last)):.1%}",
                        tok_s=f"{spent / (time.perf_counter() - start):.0f}")
        bar.update(1)

    engine_stats = None
    try:
        if todo:
            engine_stats = markov_rsa(
                params, config, [ids[i] for i in todo], **{k: settings[k] for k in KNOBS},
                temperature=settings["temperature"], top_p=settings["top_p"], seed=settings["seed"], template=template,
                on_problem=on_problem, slots=slots,
                progress=lambda t, rnd: bar.set_description(f"round {t}/{settings['rounds']} done")).engine_stats
        bar.close()
        seconds = time.perf_counter() - start
        summary = summarize([records[p.index] for p in problems], settings)
        table = format_table(summary) + f"\n{len(problems)} problems; this run solved {len(todo)} in {seconds:.1f} s"
        if engine_stats is not None:  # this run's engine (as its time): not in summary.json, a function of the records
            table += (f"; prefix cache: {engine_stats['prefix_tokens']:,} of {engine_stats['prompt_tokens']:,} "
                      f"prompt tokens, slot utilisation {engine_stats['slot_utilisation']:.0%}")
        if run_dir:
            run_dir.write_summary(summary, table)
    finally:
        if run_dir:
            run_dir.close()
    return summary, table
