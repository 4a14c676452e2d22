"""A verifiable synthetic task: multi-term integer addition written out step by step.

Question ``47+38+91+26``; solution ``47+38=85\\n85+91=176\\n176+26=202\\n\\boxed{202}``. Problems are a
pure function of (split, index), so the held-out split is fixed and never overlaps training.
Corrupted solutions (one wrong step, propagated to the end) stand in for wrong candidates when
teaching aggregation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

SPLITS = {"train": 0, "test": 1}
MIN_TERMS, MAX_TERMS = 3, 4
MIN_VALUE, MAX_VALUE = 10, 99


@dataclasses.dataclass(frozen=True)
class Problem:
    terms: tuple[int, ...]

    @property
    def question(self) -> str:
        return "+".join(map(str, self.terms))

    @property
    def answer(self) -> str:
        return str(sum(self.terms))

    def solution(self, error_step: int | None = None, rng: random.Random | None = None) -> str:
        """The step-by-step solution; with ``error_step``, that step's sum is off and the error propagates."""
        lines, total = [], self.terms[0]
        for step, term in enumerate(self.terms[1:]):
            new = total + term
            if step == error_step:
                new = corrupt(new, rng or random.Random(0))
            lines.append(f"{total}+{term}={new}")
            total = new
        return "\n".join(lines) + f"\n\\boxed{{{total}}}"


def corrupt(value: int, rng: random.Random) -> int:
    """A plausible arithmetic slip: one digit off by one (a missed or extra carry)."""
    digits = list(str(value))
    i = rng.randrange(len(digits))
    d = int(digits[i]) + rng.choice((-1, 1))
    if d < 0 or d > 9 or (i == 0 and d == 0):
        d = int(digits[i]) - (d - int(digits[i]))
    digits[i] = str(d)
    return int("".join(digits))


def problem(split: str, index: int) -> Problem:
    """Problem ``index`` of ``split``: a deterministic function of both."""
    seed = int.from_bytes(hashlib.sha256(f"{SPLITS[split]}:{index}".encode()).digest()[:8], "little")
    rng = random.Random(seed)
    n = rng.randint(MIN_TERMS, MAX_TERMS)
    return Problem(tuple(rng.randint(MIN_VALUE, MAX_VALUE) for _ in range(n)))


def problems(split: str, count: int, start: int = 0) -> list[Problem]:
    return [problem(split, i) for i in range(start, start + count)]


def is_correct(answer: str | None, prob: Problem) -> bool:
    return answer is not None and answer.strip() == prob.answer
