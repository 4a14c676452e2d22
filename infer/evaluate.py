"""Benchmark scoring with test-time compute: the dataset, grading, per-problem records and the summary.

Pure functions over plain data; ``eval_cli`` runs the model and ``eval_output`` writes the run directory.
A record (one line of ``results.jsonl``) is one problem's every round: extracted answers, correctness,
the majority vote, tokens; the summary is a function of the records in dataset order alone.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Callable, Sequence

from zaya_jax.jsonl import read_objects

from .rsa import extract_boxed

QUESTION_KEYS = ("question", "problem", "prompt")
GRADERS = ("math", "exact")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark problem: ``index`` is its position in the dataset, ``line`` its line in the file."""

    index: int
    id: str
    question: str
    answer: str
    line: int


def read_dataset(path: str, limit: int | None = None) -> list[Problem]:
    """The problems of a JSONL file (``{"question"|"problem"|"prompt": ..., "answer": ..., "id"?: ...}``),
    the first ``limit`` when given; errors name the file and line."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be positive, got {limit}")
    problems, ids = [], {}
    lines = read_objects(path, what="problems")
    given = {str(obj["id"]) for _, obj in lines if "id" in obj}
    for line, obj in lines:
        key = next((k for k in QUESTION_KEYS if k in obj), None)
        if key is None or not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"{path}:{line}: no question: give a non-empty string under one of {', '.join(QUESTION_KEYS)}")
        answer = obj.get("answer")
        if answer is None or isinstance(answer, (dict, list, bool)) or not str(answer).strip():
            raise ValueError(f"{path}:{line}: no answer: give the gold answer as a string or number under \"answer\"")
        pid = str(obj["id"]) if "id" in obj else _position_id(len(problems), given)
        if pid in ids:
            raise ValueError(f"{path}:{line}: id {pid!r} is also the id of line {ids[pid]}")
        ids[pid] = line
        problems.append(Problem(len(problems), pid, obj[key], str(answer).strip(), line))
        if limit is not None and len(problems) == limit:
            break
    return problems


def _position_id(index: int, given: set[str]) -> str:
    """The id of the problem at ``index`` that has none: its position, or ``#position`` when another line's
    own id is the position."""
    return str(index) if str(index) not in given else f"#{index}"


def apply_prompt_template(template: str | None, question: str) -> str:
    """``template`` with ``{question}`` replaced (no other braces are read: ``\\boxed{}`` stays as written)."""
    if template is None:
        return question
    if "{question}" not in template:
        raise ValueError(f"--prompt-template must contain {{question}}, got {template!r}")
    return template.replace("{question}", question)


# ---------------------------------------------------------------------------------------------- grading
class Grader:
    """Extracts a candidate's last ``\\boxed{}`` and compares it with the gold answer.

    ``math``: HuggingFace math-verify parses both sides as LaTeX and checks equivalence (``\\frac{1}{2}``
    = ``0.5``, ``1,000`` = ``1000``, intervals, sets, ...). ``exact``: the stripped strings are equal.
    """

    def __init__(self, kind: str = "math"):
        if kind not in GRADERS:
            raise ValueError(f"unknown grader {kind!r}; expected one of {', '.join(GRADERS)}")
        self.kind = kind
        if kind == "math":
            import math_verify  # noqa: F401  (fail here, before the model runs, when it is missing)

    extract = staticmethod(extract_boxed)

    def equal(self, gold: str, answer: str | None) -> bool:
        if answer is None:
            return False
        if self.kind == "exact":
            return answer.strip() == gold.strip()
        return _verify(gold, answer)


def _timeout() -> int | None:
    # math-verify times out with signal.alarm, which works in the main thread only.
    return 5 if threading.current_thread() is threading.main_thread() else None


@functools.lru_cache(maxsize=65536)
def _parse(text: str):
    import math_verify

    # Both sides in $...$ (as the RSA authors' grader does) so that math-verify reads them as LaTeX.
    return math_verify.parse(f"${text}$", parsing_timeout=_timeout())


@functools.lru_cache(maxsize=65536)
def _verify(gold: str, answer: str) -> bool:
    # Answers repeat across members and rounds: caching keeps sympy out of the way.
    import math_verify

    return bool(math_verify.verify(_parse(gold), _parse(answer), timeout_seconds=_timeout()))


def majority_vote(answers: Sequence[str | None], same: Callable[[str, str], bool]) -> str | None:
    """The representative of the largest cluster of equivalent answers (greedy clustering against each
    cluster's first member; ties: the cluster seen first); None when no member has an answer."""
    clusters: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        home = next((c for c in clusters if c[0] == a or same(c[0], a)), None)
        if home is None:
            clusters.append([a])
        else:
            home.append(a)
    return max(clusters, key=len)[0] if clusters else None  # max keeps the first of equal lengths


# ---------------------------------------------------------------------------------------------- records
def score_problem(problem: Problem, result, grader: Grader, decode: Callable[[list[int]], str], *,
                  save_texts: bool = False) -> dict:
    """The ``results.jsonl`` record of one problem from its ``RSAResult`` part (one problem).

    rounds[t]: answers [N] (None: no box), correct [N], majority, majority_correct, tokens (generated in
    round t), seconds; the whole record: tokens, seconds, and texts [T+1][N] with ``save_texts``.
    """
    rounds, texts = [], []
    for rnd in result.rounds:
        round_texts = [decode(c) for c in rnd.candidates[0]]
        answers = [grader.extract(t) for t in round_texts]
        vote = majority_vote(answers, grader.equal)
        rounds.append({"answers": answers, "correct": [grader.equal(problem.answer, a) for a in answers],
                       "majority": vote, "majority_correct": grader.equal(problem.answer, vote),
                       "tokens": int(rnd.generated_tokens), "seconds": round(rnd.seconds, 3)})
        texts.append(round_texts)
    record = {"index": problem.index, "id": problem.id, "answer": problem.answer, "rounds": rounds,
              "tokens": sum(r["tokens"] for r in rounds), "seconds": round(sum(r["seconds"] for r in rounds), 3)}
    if save_texts:
        record["texts"] = texts
    return record


# ---------------------------------------------------------------------------------------------- summary
def summarize(records: Sequence[dict], settings: dict) -> dict:
    """Scores over ``records`` (in dataset order; no timings, so equal records give equal summaries).

    Per round t: mean accuracy of its members (round 0: pass@1), accuracy of their majority vote (round
    0: majority@N), tokens generated in it and up to it. ``rows`` is the table: single sample, majority
    vote, then each aggregation round and its majority vote.
    """
    if not records:
        raise ValueError("no problems were scored")
    records = sorted(records, key=lambda r: r["index"])
    n, c = settings["population"], settings["tails"]
    rounds, spent = [], 0
    for t in range(len(records[0]["rounds"])):
        per = [r["rounds"][t] for r in records]
        correct = sum(sum(p["correct"]) for p in per)
        members = sum(len(p["correct"]) for p in per)
        votes = sum(p["majority_correct"] for p in per)
        tokens = sum(p["tokens"] for p in per)
        spent += tokens
        rounds.append({"round": t, "mean_accuracy": correct / members, "correct_members": correct, "members": members,
                       "majority_accuracy": votes / len(per), "majority_correct": votes, "tokens": tokens,
                       "tokens_so_far": spent})
    rows = [{"method": "single sample", "metric": "pass@1", "accuracy": rounds[0]["mean_accuracy"],
             "tokens": rounds[0]["tokens"] // n},
            {"method": f"majority vote (N={n})", "metric": f"majority@{n}", "accuracy": rounds[0]["majority_accuracy"],
             "tokens": rounds[0]["tokens"]}]
    for r in rounds[1:]:
        t = r["round"]
        rows.append({"method": f"Markov RSA round {t} (N={n}, C={c})", "metric": f"round {t} mean",
                     "accuracy": r["mean_accuracy"], "tokens": r["tokens_so_far"]})
        rows.append({"method": f"Markov RSA round {t} + majority vote", "metric": f"round {t} majority",
                     "accuracy": r["majority_accuracy"], "tokens": r["tokens_so_far"]})
    return {"settings": settings, "problems": len(records), "pass@1": rounds[0]["mean_accuracy"],
            f"majority@{n}": rounds[0]["majority_accuracy"], "rounds": rounds, "rows": rows}


def format_table(summary: dict) -> str:
    """The summary as a Markdown table, and the lift of the last round's members over a single sample."""
    lines = ["| method | accuracy | generated tokens |", "| --- | ---: | ---: |"]
    lines += [f"| {r['method']} | {r['accuracy']:.1%} | {r['tokens']:,d} |" for r in summary["rows"]]
    last = summary["rounds"][-1]
    if last["round"] > 0:
        lift = 100 * (last["mean_accuracy"] - summary["rounds"][0]["mean_accuracy"])
        lines.append(f"\nMarkov RSA after round {last['round']} vs a single sample: {lift:+.1f} points")
    return "\n".join(lines)


def check_context(problems: Sequence[Problem], question_ids: Sequence[Sequence[int]], template, rsa,
                  max_len: int, source: str) -> None:
    """Raises, naming the line and the overshoot, when a problem's prompts plus new tokens exceed ``max_len``
    (``rsa.context_needs``: the sizes Markov RSA itself checks). ``template`` is the run's ``rsa.TokenTemplate``,
    ``rsa`` its ``RSAConfig``."""
    from .rsa import context_needs

    for p, q in zip(problems, question_ids):
        for what, prompt, new in context_needs(template, len(q), rsa):
            if prompt + new > max_len:
                raise ValueError(f"{source}:{p.line}: {what} is {prompt} tokens; with {new} new tokens that is "
                                 f"{prompt + new - max_len} more than the model's context of {max_len}")
