"""The trained default model's task, tokenizer and data, and the ``zaya demo`` command."""

import os

# The shipped demo model (native HF layout, with tokenizer and chat template): what every command
# uses when no model directory is given.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")

# The shipped model solves 97.5% of held-out problems in one sample at temperature 1.0, which leaves
# test-time compute nothing to fix; at 1.5 its samples slip (about 80%) and aggregation has work to do.
DEMO_TEMPERATURE = 1.5
