"""A verifiable synthetic task: multi-term integer addition written out step by step.

Three to five two-digit numbers. Question ``47+85+26``; solution ``47+85=132\\n132+26=158\\n\\boxed{158}``:
most steps carry, and a slip anywhere carries to the answer, so longer chains fail more often (the room
test-time compute works in). Problems are a pure function of (split, index); which split a problem
belongs to is a function of its terms, so the held-out split is fixed and never overlaps training.
Corrupted solutions (one wrong step, propagated to the end) stand in for wrong candidates when teaching
aggregation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

SPLITS = {"train": 0, "test": 1}
MIN_TERMS, MAX_TERMS = 3, 5
FIRST_TERM = (10, 99)  # the starting two-digit number
STEP_TERM = (10, 99)  # every later term: two digits too, so most steps carry
TEST_SHARE = 8  # 1 in TEST_SHARE of all problems is held out


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


def held_out(terms: tuple[int, ...]) -> bool:
    """Whether a problem belongs to the test split: a hash of its terms, so the splits never overlap."""
    return hashlib.sha256("+".join(map(str, terms)).encode()).digest()[0] % TEST_SHARE == 0


def problem(split: str, index: int) -> Problem:
    """Problem ``index`` of ``split``: a deterministic function of both."""
    seed = int.from_bytes(hashlib.sha256(f"{SPLITS[split]}:{index}".encode()).digest()[:8], "little")
    rng = random.Random(seed)
    while True:  # draw until the problem falls in ``split``
        n = rng.randint(MIN_TERMS, MAX_TERMS)
        terms = (rng.randint(*FIRST_TERM),) + tuple(rng.randint(*STEP_TERM) for _ in range(n - 1))
        if held_out(terms) == (split == "test"):
            return Problem(terms)


def problems(split: str, count: int, start: int = 0) -> list[Problem]:
    return [problem(split, i) for i in range(start, start + count)]

