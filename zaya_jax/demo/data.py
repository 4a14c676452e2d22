"""Training data for the demo model: solving, and aggregating candidate tails (ZAYA1-style).

60% of the examples teach the task (question -> step-by-step solution); the other 40% teach
aggregation: the question plus ``TAILS`` candidate tails — the last ``TAIL_TOKENS`` characters of
whole solutions or of final steps, a random number of them wrong (one corrupted step, propagated) —
and as the target the correct solution's final step and boxed answer (``final_step``), the part of a
solution a tail shows.
The aggregation prompt is exactly what Markov RSA builds at run time from ``TEMPLATE`` (see
``zaya_jax.infer.rsa``).

Why the final step and not the whole chain: trained on the whole chain, the model learns to re-derive
it and ignore the candidates, because under teacher forcing its own earlier lines are always right;
at sampling time its slips then compound exactly as in a fresh sample, and Markov RSA gained nothing
(58.1% single sample vs 56.0% after two rounds, 64 problems, step 750 of that run). Reconciling the
candidates' running totals and re-checking the last addition is what it can do better than a fresh
sample. Final steps appear among the candidates because later rounds aggregate earlier aggregations:
trained on whole-solution tails only, round 2 fell below round 1 (20.3% -> 8.0% at step 500).
"""

from __future__ import annotations

import json
import os
import random

from zaya_jax.infer.rsa import AggregationTemplate

from . import arith

TAILS = 4
TAIL_TOKENS = 24  # characters = tokens: about the last two steps and the boxed answer
BUDGET = 64  # the longest solution (6 terms, 3-digit sums) is 61 characters
TEMPLATE = AggregationTemplate(intro="Combine: ", before_candidates="\n", header="#{i} ...", separator="\n",
                               closing="Answer:")


def solve_record(prob: arith.Problem) -> dict:
    return {"messages": [{"role": "user", "content": prob.question},
                         {"role": "assistant", "content": prob.solution()}]}


def final_step(prob: arith.Problem, error_step: int | None = None, rng: random.Random | None = None) -> str:
    """The solution's last line and boxed answer, e.g. ``61+9=70\\n\\boxed{70}`` (``error_step``: of a
    corrupted solution, see ``arith.Problem.solution``)."""
    return "\n".join(prob.solution(error_step, rng).split("\n")[-2:])


def aggregate_record(prob: arith.Problem, rng: random.Random, tails: int = TAILS) -> dict:
    """An aggregation example. Candidates are, half and half, tails of whole solutions (what round 1
    aggregates) and final steps (what an aggregation round writes, so what later rounds aggregate)."""
    wrong_rate = rng.random() * 0.8
    candidates = []
    for _ in range(tails):
        steps = len(prob.terms) - 1
        error_step = rng.randrange(steps) if rng.random() < wrong_rate else None
        whole = rng.random() < 0.5
        text = prob.solution(error_step, rng) if whole else final_step(prob, error_step, rng)
        candidates.append(text[-TAIL_TOKENS:])
    return {"messages": [{"role": "user", "content": TEMPLATE.render(prob.question, candidates)},
                         {"role": "assistant", "content": final_step(prob)}]}


def write_training_data(path: str, count: int, seed: int = 0) -> None:
    """``count`` JSONL records (60% solve, 40% aggregate) from the train split, written atomically."""
    rng = random.Random(seed)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for i in range(count):
            prob = arith.problem("train", i)
            record = solve_record(prob) if i % 5 < 3 else aggregate_record(prob, rng)
            f.write(json.dumps(record) + "\n")
    os.replace(tmp, path)
