"""bench/quant_logits.py: the demo batch it scores, and the reply positions it reports apart."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import quant_logits  # noqa: E402

from zaya_jax.demo import DEFAULT_MODEL_DIR, arith  # noqa: E402
from zaya_jax.infer.tokenizer import Tokenizer  # noqa: E402


def test_demo_batch_is_left_padded_and_reply_positions_predict_the_reply():
    ids, attention, reply = quant_logits.demo_batch(3)
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    assert ids.shape == attention.shape == reply.shape and len(ids) == 6
    for row in range(len(ids)):
        real = attention[row].astype(bool)
        assert not real[: np.argmax(real)].any() and real[np.argmax(real):].all()  # left padding only
        assert not reply[row][~real].any()
    for i, prob in enumerate(arith.problems("test", 3)):
        solve, aggregate = (ids[r][np.roll(reply[r], 1).astype(bool)].tolist() for r in (2 * i, 2 * i + 1))
        assert tokenizer.decode(solve).startswith(prob.solution())  # the gold solution, then the turn's end
        assert tokenizer.decode(aggregate).startswith(f"\\boxed{{{prob.answer}}}")
