"""Verifiers for RL: a rollout's text and the gold answer -> a reward.

``math``: 1.0 when the last ``\\boxed{}`` is equivalent to the gold answer under math-verify (the
``zaya eval`` grader), else 0.0. ``exact``: 1.0 when the last ``\\boxed{}`` equals it as a string (the
demo task's check: its answers are integers). ``module:fn``: any importable function
``fn(text: str, answer: str) -> float``.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

from zaya_jax.infer.evaluate import GRADERS, Grader

Verifier = Callable[[str, str], float]


def load_verifier(spec: str) -> Verifier:
    """The verifier ``spec`` names (``math``, ``exact`` or ``module:fn``); ValueError naming what is wrong."""
    if spec in GRADERS:
        grader = Grader(spec)
        return lambda text, answer: float(grader.equal(answer, grader.extract(text)))
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"--verifier must be one of {', '.join(GRADERS)} or module:function, got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--verifier {spec}: cannot load it ({e})") from None
    if not callable(fn):
        raise ValueError(f"--verifier {spec} is not a function")

    def verify(text: str, answer: str) -> float:
        try:
            value = fn(text, answer)
        except Exception as e:  # the user's function failing is bad input, said as such, not a traceback of ours
            raise ValueError(f"--verifier {spec} raised {e!r} (called as {name}(text, answer))") from e
        try:
            reward = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"--verifier {spec} returned {value!r:.80}, not a number") from None
        if not math.isfinite(reward):
            raise ValueError(f"--verifier {spec} returned {reward}: rewards must be finite")
        return reward

    return verify
