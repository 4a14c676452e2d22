"""Inputs refused with a message naming them: ids out of the vocabulary, negative, float, empty or
longer than the context at ``zaya_jax.forward`` and ``zaya forward``; empty --prompt-ids items; characters
the demo tokenizer cannot spell."""

import re

import numpy as np
import pytest

import zaya_jax
from zaya_jax import InputError, ZayaConfig
from zaya_jax.cli import main
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.infer.tokenizer import Tokenizer, TokenizerError


def test_unknown_characters_are_refused_not_mapped_to_pad():
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    assert tokenizer.encode("1+2<pad>", add_special_tokens=False)[-1] == 0  # the literal token still encodes
    with pytest.raises(TokenizerError, match=r"no token for '\u20ac' \(character 1 of the text\)"):
        tokenizer.encode("1\u20ac2")


def test_prompt_ids_refuse_an_empty_item(capsys):
    assert main(["forward", "--prompt-ids", "2,,3"]) == 2
    assert "--prompt-ids must be comma-separated integers: item 2 is empty" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["forward", "--prompt-ids", "2,99999"], r"input_ids\[0, 1\] = 99999 outside the vocabulary"),
    (["forward", "--prompt-ids", "-1"], r"input_ids\[0, 0\] = -1 outside the vocabulary"),
    (["forward", "--prompt-ids", ",".join(["5"] * 1025)], "1025 tokens per row, more than the model's "
                                                            "max_position_embeddings=1024"),
])
def test_forward_command_refuses_bad_ids(capsys, argv, message):
    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


CONFIG = ZayaConfig(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                    head_dim=16, moe_intermediate_size=16, num_experts=2, router_hidden_size=8,
                    max_position_embeddings=12)


@pytest.mark.parametrize("ids, mask, message", [
    ([[1, 48]], None, r"input_ids\[0, 1\] = 48 outside the vocabulary \[0, 48\)"),
    ([[-1, 3], [2, -5]], None, r"input_ids\[0, 0\] = -1 outside the vocabulary \[0, 48\) \(2 values in all\)"),
    (np.array([[1.0, 2.0]]), None, "input_ids must hold integers, got dtype float64"),
    (np.zeros((1, 0), np.int32), None, r"at least one token per row, got shape \(1, 0\)"),
    ([[1] * 13], None, "13 tokens per row, more than the model's max_position_embeddings=12"),
    ([[1, 2], [3]], None, "rectangular array of integers"),
    ([[1, 2]], [[0, 2]], r"attention_mask\[0, 1\] = 2 is not 0 or 1"),
    ([[1, 2, 3], [4, 5, 6]], [[0, 1, 1], [1, 0, 1]], r"attention_mask\[1, 1\] = 0 lies between real tokens"),
    ([[1, 2]], [[1, 1, 1]], r"attention_mask shape \(1, 3\) != input_ids shape \(1, 2\)"),
])
def test_forward_refuses_bad_ids_before_running(ids, mask, message):
    # Refused before the params are touched (here there are none): nothing reaches jit.
    with pytest.raises(InputError, match=message):
        zaya_jax.forward(None, CONFIG, ids, mask)
