"""The trained default model's task, tokenizer and data, and the ``zaya demo`` command."""

import os

# The shipped demo model (native HF layout, with tokenizer and chat template): what every command
# uses when no model directory is given.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")


def is_demo_model(path: str | None) -> bool:
    """Whether ``path`` (None: no model given) is the shipped demo model."""
    return path is None or os.path.abspath(path) == os.path.abspath(DEFAULT_MODEL_DIR)


# Markov RSA's own setting (ZAYA1's test-time compute samples at temperature 1.0, top-p 1.0): the
# shipped model solves about 80% of held-out problems in one sample there, for reasons of its own
# (two-digit carries it has not fully learned), so aggregation has real work to do.
DEMO_TEMPERATURE = 1.0

# The Markov RSA settings `zaya demo` (and `zaya rsa` on the demo model) run: N and T; C, tau and the
# budget are those of the training data (zaya_jax.demo.data): the model was taught to aggregate TAILS tails
# of TAIL_TOKENS tokens (characters), and the longest solution (5 terms, 3-digit sums) is 54 characters.
DEMO_POPULATION = 16
DEMO_ROUNDS = 2
TAILS = 4
TAIL_TOKENS = 24  # the last step and the boxed answer
BUDGET = 64
