"""The trained default model's task, tokenizer and data, and the ``zaya demo`` command."""

import os

# The shipped demo model (native HF layout, with tokenizer and chat template): what every command
# uses when no model directory is given.
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(__file__), "model")
