"""Training data for the demo model: solving, and aggregating candidate tails (ZAYA1-style).

Two stages. Stage 1 (from a fresh init): 60% of the examples teach the task (question -> step-by-step
solution), 40% teach aggregation with the correct final step and boxed answer as the target. Stage 2
(fine-tuning stage 1's model on problems it has not seen): 20% solve, 80% aggregation with the boxed
answer alone as the target. An aggregation example is the question plus ``TAILS`` candidate tails —
the last ``TAIL_TOKENS`` characters of whole solutions or of what an aggregation round writes, a
random number of them wrong (one corrupted step, propagated). The aggregation prompt is exactly what
Markov RSA builds at run time from ``TEMPLATE`` (see ``zaya_jax.infer.rsa``).

Why the final step and not the whole chain: trained on the whole chain, the model learns to re-derive
it and ignore the candidates, because under teacher forcing its own earlier lines are always right;
at sampling time its slips then compound exactly as in a fresh sample, and Markov RSA gained nothing
(58.1% single sample vs 56.0% after two rounds, 64 problems, step 750 of that run). Reconciling the
candidates' running totals and re-checking the last addition is what it can do better than a fresh
sample. Final steps appear among the candidates because later rounds aggregate earlier aggregations:
trained on whole-solution tails only, round 2 fell below round 1 (20.3% -> 8.0% at step 500). (Both
measured on an earlier version of the task, with one-digit steps.)
Why stage 2 drops the final step: rewriting the last addition, the stage-1 aggregator slipped even where
most candidates agreed (87.7% right with 3 of 4 candidates right, round 2) and accuracy decayed after
round 2; choosing the answer alone, it is 94.6% right there, and Markov RSA's lift after two rounds went
from +4.4 to +8.4 points (200 validation problems; docs/demo_model.md).
"""

from __future__ import annotations

import json
import os
import random

from zaya_jax.infer.rsa import AggregationTemplate

from . import BUDGET, TAIL_TOKENS, TAILS, arith  # noqa: F401  (the settings the model is run with, beside TEMPLATE)

TEMPLATE = AggregationTemplate(intro="Combine: ", before_candidates="\n", header="#{i} ...", separator="\n",
                               closing="Answer:")


def solve_record(prob: arith.Problem) -> dict:
    return {"messages": [{"role": "user", "content": prob.question},
                         {"role": "assistant", "content": prob.solution()}]}


# What an aggregation round is taught to write: the solution's last lines. Stage 1 (the mixed
# curriculum) targets the final step and boxed answer; stage 2 (aggregation-heavy) the boxed answer alone.
TARGET_LINES = {"final_step": 2, "answer": 1}
STAGE2_EXAMPLES = 40_000
# Which of every five consecutive problems become aggregation examples (the others: solve examples).
AGGREGATE_SLOTS = {1: (3, 4), 2: (0, 1, 2, 3)}


def last_lines(text: str, count: int) -> str:
    """The last ``count`` lines of a solution: ``last_lines(s, 2)`` is e.g. ``132+26=158\\n\\boxed{158}``."""
    return "\n".join(text.split("\n")[-count:])


def aggregate_record(prob: arith.Problem, rng: random.Random, tails: int = TAILS, target: str = "final_step") -> dict:
    """An aggregation example. Candidates are, half and half, tails of whole solutions (what round 1
    aggregates) and what an aggregation round writes (``target``'s lines, so what later rounds aggregate);
    a random number of them come from corrupted solutions."""
    if target not in TARGET_LINES:
        raise ValueError(f"unknown aggregation target {target!r}; expected one of {sorted(TARGET_LINES)}")
    wrong_rate = rng.random() * 0.8
    candidates = []
    for _ in range(tails):
        steps = len(prob.terms) - 1
        error_step = rng.randrange(steps) if rng.random() < wrong_rate else None
        # A coin for the candidate's kind: drawn before the solution in stage 1, after it in stage 2 (the
        # order the shipped model's data was drawn in, kept so the documented commands reproduce it).
        if target == "final_step":
            whole = rng.random() < 0.5
            text = prob.solution(error_step, rng)
        else:
            text = prob.solution(error_step, rng)
            whole = rng.random() < 0.5
        candidates.append((text if whole else last_lines(text, TARGET_LINES[target]))[-TAIL_TOKENS:])
    return {"messages": [{"role": "user", "content": TEMPLATE.render(prob.question, candidates)},
                         {"role": "assistant", "content": last_lines(prob.solution(), TARGET_LINES[target])}]}


def write_training_data(path: str, count: int, seed: int = 0, *, stage: int = 1, first_problem: int = 0) -> None:
    """``count`` JSONL records from the train split (problems ``first_problem`` on), written atomically.

    Stage 1: 60% solve, 40% aggregate with final-step targets. Stage 2 (fine-tuning the stage-1 model;
    give it problems stage 1 did not use): 20% solve, 80% aggregate with boxed-answer targets.
    """
    if stage not in AGGREGATE_SLOTS:
        raise ValueError(f"stage must be 1 or 2, got {stage}")
    target = "final_step" if stage == 1 else "answer"
    rng = random.Random(seed + stage - 1)  # each stage a stream of its own
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(first_problem, first_problem + count):
            prob = arith.problem("train", i)
            aggregate = i % 5 in AGGREGATE_SLOTS[stage]
            record = aggregate_record(prob, rng, target=target) if aggregate else solve_record(prob)
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
