"""Accuracy of single samples, majority vote and Markov RSA rounds on held-out problems."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from zaya_jax.infer import rsa

from . import DEMO_POPULATION, DEMO_ROUNDS, DEMO_TEMPERATURE, arith, data


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the demo table."""

    method: str
    accuracy: float  # fraction of problems solved
    tokens: int  # generated tokens spent on all problems (cumulative over rounds)


def evaluate(params, config, tokenizer, problems: list[arith.Problem], *, population: int = DEMO_POPULATION,
             tails: int = data.TAILS, rounds: int = DEMO_ROUNDS, budget: int = data.BUDGET, tail_tokens: int = data.TAIL_TOKENS,
             temperature: float = DEMO_TEMPERATURE, seed: int = 0, progress=None) -> tuple[list[Row], dict]:
    """Runs Markov RSA on ``problems`` and scores every stage.

    Rows: single sample (mean correctness over round-0 members), majority vote over the round-0
    population, then Markov RSA after each round (mean correctness over that round's members, the
    expected accuracy of one final candidate) and its majority vote after the last round.
    """
    template = rsa.TokenTemplate.from_tokenizer(data.TEMPLATE, tails, tokenizer)
    start = time.perf_counter()
    result = rsa.markov_rsa(params, config, [tokenizer.encode(p.question, add_special_tokens=False) for p in problems], population=population,
                            tails=tails, rounds=rounds, budget=budget, tail_tokens=tail_tokens,
                            temperature=temperature, seed=seed, template=template, progress=progress)
    seconds = time.perf_counter() - start
    rows, spent = [], 0
    for t, rnd in enumerate(result.rounds):
        answers = [[rsa.extract_boxed(tokenizer.decode(c)) for c in row] for row in rnd.candidates]
        correct = np.array([[arith.is_correct(a, p) for a in row] for row, p in zip(answers, problems)])
        votes = np.array([arith.is_correct(rsa.majority(row)[0], p) for row, p in zip(answers, problems)])
        spent += rnd.generated_tokens
        if t == 0:
            rows.append(Row("single sample", float(correct.mean()), rnd.generated_tokens // population))
            rows.append(Row(f"majority vote (N={population})", float(votes.mean()), spent))
        else:
            rows.append(Row(f"Markov RSA round {t} (N={population}, C={tails})", float(correct.mean()), spent))
        if t == rounds and rounds > 0:
            rows.append(Row(f"Markov RSA round {t} + majority vote", float(votes.mean()), spent))
    info = {"problems": len(problems), "seconds": seconds, "temperature": temperature, "population": population,
            "tails": tails,
            "rounds": rounds, "budget": budget, "tail_tokens": tail_tokens}
    return rows, info


def format_table(rows: list[Row], info: dict) -> str:
    lines = [f"{'method':<44} {'accuracy':>9} {'tokens':>10}", "-" * 65]
    lines += [f"{r.method:<44} {r.accuracy:>8.1%} {r.tokens:>10,d}" for r in rows]
    if info["rounds"] > 0:
        last = next(r for r in reversed(rows) if r.method.startswith(f"Markov RSA round {info['rounds']} ("))
        lift = 100 * (last.accuracy - rows[0].accuracy)
        lines.append(f"Markov RSA after round {info['rounds']} vs a single sample: {lift:+.1f} points")
    lines.append(f"{info['problems']} held-out problems, {info['seconds']:.1f} s")
    return "\n".join(lines)
