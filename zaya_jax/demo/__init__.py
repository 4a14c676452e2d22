"""The trained default model's task, tokenizer and data, and the ``zaya demo`` command."""
