"""What an aggregator that only chooses could reach: Markov RSA's ceiling on a measured population.

Reads a ``zaya demo --save-texts --out DIR`` run (``DIR/results.jsonl``, ``DIR/run.json``) and prints, for the demo's
arithmetic task:

- per round-0 correct count k of 16: how many problems, the majority vote's accuracy, Markov RSA's
  measured member accuracy after rounds 1 and 2, and where RSA wins or loses points against the vote;
- the member accuracy after rounds 1 and 2 of simulated aggregators on the same round-0 answers,
  with the run's N, C and T:
  * ``plurality``: each member takes the majority vote of its C candidates (ties at random);
  * ``last-step check``: drops candidates whose last written addition is wrong (what a 24-token tail
    shows), then plurality;
  * ``whole-chain check``: right whenever any of its C candidates is right (what checking every step of
    whole solutions could reach), else plurality.
  Rounds after the first aggregate answers alone (the demo aggregator writes ``\\boxed{}`` only), so they
  are plurality in every row.

``python bench/rsa_ceiling.py DIR [--repeats 30] [--seed 0]``
"""

from __future__ import annotations

import argparse
import collections
import json
import operator
import os
import re

import numpy as np

from zaya_jax.infer.evaluate import majority_vote

STEP = re.compile(r"(\d+)\+(\d+)=(\d+)")


def last_step_ok(text: str) -> bool:
    """Whether the last ``a+b=c`` line of a solution adds up (False when there is none)."""
    steps = [STEP.fullmatch(line) for line in text.strip().split("\n")]
    steps = [m for m in steps if m]
    if not steps:
        return False
    a, b, c = map(int, steps[-1].groups())
    return a + b == c


def plurality(answers) -> str | None:
    """The evaluator's majority vote (exact equality). Candidates come in random order, so its tie rule
    (the answer seen first) breaks ties at random."""
    return majority_vote(answers, operator.eq)


def simulate(answers, gold, rule, *, tails, rounds, rng, texts=None):
    """Member accuracy after each of ``rounds`` rounds (list of floats) of aggregator ``rule``."""
    population, accuracy = list(answers), []
    for t in range(rounds):
        nxt = []
        for _ in range(len(population)):
            pick = rng.choice(len(population), size=tails, replace=False)
            cands = [population[i] for i in pick]
            if t == 0 and rule == "last-step check":
                checked = [population[i] for i in pick if last_step_ok(texts[i])]
                nxt.append(plurality(checked or cands))
            elif t == 0 and rule == "whole-chain check" and gold in cands:
                nxt.append(gold)
            else:
                nxt.append(plurality(cands))
        population = nxt
        accuracy.append(float(np.mean([a == gold for a in population])))
    return accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the --out DIR of a `zaya demo --save-texts` run")
    p.add_argument("--repeats", type=int, default=30, help="simulations per problem (default 30)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    with open(os.path.join(args.run, "results.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(args.run, "run.json")) as f:
        settings = json.load(f)
    tails, rounds = settings["tails"], settings["rounds"]
    if rounds < 1 or any("texts" not in r for r in records):
        raise SystemExit(f"{args.run} needs aggregation rounds and texts: run zaya demo with --rounds >= 1 --save-texts")

    by_count = collections.defaultdict(list)
    for r in records:
        by_count[sum(r["rounds"][0]["correct"])].append(r)
    n0 = len(records[0]["rounds"][0]["correct"])
    print(f"{len(records)} problems, N={n0}, C={tails}, T={rounds}\n")
    print("| round-0 correct | problems | majority | RSA round 1 | RSA round T | RSA T - majority (problems) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for k in sorted(by_count):
        rs = by_count[k]
        maj = np.mean([r["rounds"][0]["majority_correct"] for r in rs])
        r1 = np.mean([np.mean(r["rounds"][1]["correct"]) for r in rs])
        rt = np.mean([np.mean(r["rounds"][-1]["correct"]) for r in rs])
        print(f"| {k}/{n0} | {len(rs)} | {maj:.2f} | {r1:.3f} | {rt:.3f} | {len(rs) * (rt - maj):+.2f} |")

    rng = np.random.default_rng(args.seed)
    single = 100 * np.mean([np.mean(r["rounds"][0]["correct"]) for r in records])
    majority = 100 * np.mean([r["rounds"][0]["majority_correct"] for r in records])
    measured = [100 * np.mean([np.mean(r["rounds"][t]["correct"]) for r in records]) for t in range(1, rounds + 1)]
    print(f"\nsingle sample {single:.1f}%, majority@{n0} {majority:.1f}%\n")
    print("| aggregator | " + " | ".join(f"round {t}" for t in range(1, rounds + 1)) + f" | round {rounds} - majority |")
    print("| --- |" + " ---: |" * (rounds + 1))
    print("| measured (this run) | " + " | ".join(f"{a:.1f}%" for a in measured) + f" | {measured[-1] - majority:+.1f} |")
    for rule in ("plurality", "last-step check", "whole-chain check"):
        acc = np.mean([[simulate(r["rounds"][0]["answers"], r["answer"], rule, tails=tails, rounds=rounds, rng=rng,
                                 texts=r["texts"][0]) for _ in range(args.repeats)] for r in records], axis=(0, 1))
        print(f"| {rule} (simulated) | " + " | ".join(f"{100 * a:.1f}%" for a in acc)
              + f" | {100 * acc[-1] - majority:+.1f} |")


if __name__ == "__main__":
    main()
