"""The ``zaya eval`` command: benchmark accuracy with Markov RSA over a JSONL dataset, resumable.

``run`` is the driver ``zaya demo`` shares: it sends the problems not yet done to ``markov_rsa`` and
writes each problem's record as ``on_problem`` hands it over; the summary comes from the records.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

from zaya_jax.cli import add_model_args, model_setting, resolve_model

from .rsa_cli import add_search_args, config_from_args
from .rsa_config import KNOBS, RSAConfig
from .rsa_modes import mode_template

# The RSAConfig fields a run records in run.json (beside the model, data, grader and templates).
SEARCH_FIELDS = KNOBS + ("final_budget", "temperature", "top_p", "seed")


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
    p.add_argument("--limit", type=int, help="only the first LIMIT problems")
    p.add_argument("--grader", choices=("math", "exact"), default="math",
                   help="math: math-verify equivalence (default); exact: string equality")
    p.add_argument("--prompt-template", help="text around each question, e.g. $'{question}\\nPut the final answer "
                                             "in \\\\boxed{}.' (default: the question alone)")
    p.set_defaults(func=_eval_command)


def run_settings(rsa: RSAConfig, *, model: str, data: str, grader: str, template: str,
                 prompt_template: str | None = None, limit: int | None = None) -> dict:
    """Everything the scores depend on: what run.json records and ``--resume`` compares (the search's
    settings with ``final_budget`` resolved, so that an unset one and the budget compare equal)."""
    search = {name: getattr(rsa, name) for name in SEARCH_FIELDS}
    return dict(search, final_budget=rsa.round_budget(rsa.rounds), model=model, data=data, grader=grader,
                aggregation_template=template, prompt_template=prompt_template, limit=limit)


def search_of(settings: dict) -> RSAConfig:
    """The ``RSAConfig`` a run's ``settings`` (``run_settings``) record."""
    return RSAConfig(**{name: settings[name] for name in SEARCH_FIELDS})


def _eval_command(args) -> int:
    from .evaluate import read_dataset

    problems = read_dataset(args.data, args.limit)
    rsa = config_from_args(args)
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    with open(args.data, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    recorded = run_settings(rsa, model=model_setting(args.model, desc), data=f"{os.path.basename(args.data)} "
                            f"sha256:{digest}", grader=args.grader, template=mode_template(args.model, args.mode),
                            prompt_template=args.prompt_template, limit=args.limit)
    _, table = run(params, config, args.model, problems, recorded, source=args.data, out=args.out,
                   inputs={"--data": args.data}, resume=args.resume, force=args.force, slots=args.slots, save_texts=args.save_texts,
                   progress=not args.no_progress)
    print(table)
    return 0


def run(params, config, model_dir: str, problems, settings: dict, *, source: str, out: str | None = None,
        inputs: dict[str, str] | None = None, resume: bool = False, force: bool = False, slots: int | None = None,
        save_texts: bool = False, progress: bool = True):
    """Evaluates ``problems`` (``evaluate.Problem``) under ``settings`` (``run_settings``); with ``out``, in
    that run directory, none of whose files may be one of ``inputs`` (a name -> the file the problems were
    read from); ``progress``: a tqdm bar on stderr. Returns (summary, table)."""
    from tqdm import tqdm

    from zaya_jax.validate import is_integer

    from .eval_output import RunDir
    from .evaluate import Grader, apply_prompt_template, check_context, format_table, score_problem, summarize
    from .rsa import check_questions, markov_rsa
    from .rsa_modes import token_template
    from .tokenizer import Tokenizer

    rsa = search_of(settings)
    grader = Grader(settings["grader"])
    tokenizer = Tokenizer.from_dir(model_dir)
    template = token_template(settings["aggregation_template"], rsa.tails, tokenizer)
    ids = []
    for p in problems:
        text = apply_prompt_template(settings["prompt_template"], p.question)
        try:
            ids.append(tokenizer.encode(text, add_special_tokens=False, max_tokens=config.max_position_embeddings))
        except ValueError as e:
            raise ValueError(f"{source}:{p.line}: {e}") from None
    # Every setting is checked before the run directory is touched: a refused run leaves nothing behind.
    check_questions(config, ids)
    if slots is not None and (not is_integer(slots) or slots < 1):
        raise ValueError(f"--slots must be a positive integer, got {slots!r}")
    check_context(problems, ids, template, rsa, config.max_position_embeddings, source)
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
                params, config, [ids[i] for i in todo], rsa, template=template, on_problem=on_problem, slots=slots,
                progress=lambda t, rnd: bar.set_description(f"round {t}/{rsa.rounds} done")).engine_stats
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
