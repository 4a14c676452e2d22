"""The docs of the ``zaya_arith_choice`` task: held-out addition problems of ``zaya_jax.demo.arith``.

Each doc: ``context``, the question rendered with the demo model's chat template (generation prompt
included); ``choices``, four solutions in a fixed shuffled order — the right one and three that each go
wrong at one step (``Problem.solution(error_step=...)``); ``gold``, the right one's index.
"""

from __future__ import annotations

import random

DOCS = 40


def rows(count: int = DOCS) -> list[dict]:
    from zaya_jax.demo import DEFAULT_MODEL_DIR, arith
    from zaya_jax.infer.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    out = []
    for i, problem in enumerate(arith.problems("test", count)):
        rng = random.Random(i)
        right, wrong = problem.solution(), set()
        while len(wrong) < 3:
            wrong.add(problem.solution(error_step=rng.randrange(len(problem.terms) - 1), rng=rng))
        choices = [right, *sorted(wrong)]
        rng.shuffle(choices)
        out.append({"context": tokenizer.render_chat([{"role": "user", "content": problem.question}]),
                    "choices": choices, "gold": choices.index(right)})
    return out


def docs(**kwargs) -> dict:
    """lm-eval's ``custom_dataset``: the test split as a ``datasets.Dataset``."""
    import datasets

    return {"test": datasets.Dataset.from_list(rows())}
