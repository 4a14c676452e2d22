"""The trained default model's task, tokenizer and data, and the ``zaya demo`` command."""

import os

# The shipped demo model (native HF layout, with tokenizer and chat template): what every command
# uses when no model directory is given.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")

# Markov RSA's own setting (ZAYA1's test-time compute samples at temperature 1.0, top-p 1.0): the
# shipped model solves about 80% of held-out problems in one sample there, for reasons of its own
# (two-digit carries it has not fully learned), so aggregation has real work to do.
DEMO_TEMPERATURE = 1.0

# The Markov RSA settings `zaya demo` (and `zaya rsa` on the demo model) run: N and T. C, tau and the
# budget are the training data's (zaya_jax.demo.data).
DEMO_POPULATION = 16
DEMO_ROUNDS = 2
