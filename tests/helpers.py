"""Shared test fixtures' data: the sharding tests' model and meshes (the test files import from here,
never from each other)."""

import zaya_jax
from zaya_jax import sharding as shd

# Dimensions chosen so that expert-weight shapes are recognisable in HLO: D=48 and F-family sizes
# {80, 40, 20} (2F, F, per-tensor-shard slices) appear in no other array.
CONFIG = zaya_jax.ZayaConfig(
    vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=40, num_experts=8, router_hidden_size=16,
    layer_types=("hybrid", "hybrid_sliding"), sliding_window=5,
)
# (mesh sizes, rules): pure expert, expert x tensor, data x expert, fsdp x expert.
MESHES = {
    "expert8": (dict(expert=8), shd.INFERENCE),
    "expert4_tensor2": (dict(expert=4, tensor=2), shd.INFERENCE),
    "data2_expert4": (dict(data=2, expert=4), shd.INFERENCE),
    "fsdp2_expert4": (dict(fsdp=2, expert=4), shd.TRAINING),
}


def write_rl_problem_set(root, problems: int) -> None:
    """``root/model`` (CONFIG with the demo task's character vocabulary, random weights) and
    ``root/data.jsonl`` (``problems`` sums "i+i" with their answers): what the ``zaya rl`` tests run on."""
    import dataclasses
    import json

    import jax

    from zaya_jax.convert import save_hf
    from zaya_jax.demo import vocab

    config = dataclasses.replace(CONFIG, vocab_size=len(vocab.SPECIALS) + len(vocab.CHARACTERS), pad_token_id=0,
                                 bos_token_id=2, eos_token_id=(4,))
    save_hf(zaya_jax.model.init(config, jax.random.key(0)), config, str(root / "model"))
    vocab.write(str(root / "model"))
    with open(root / "data.jsonl", "w") as f:
        for i in range(problems):
            f.write(json.dumps({"question": f"{i}+{i}", "answer": str(2 * i)}) + "\n")


def constant_reward(text: str, answer: str) -> float:
    """A verifier under which every group ties (``--verifier helpers:constant_reward``)."""
    return 1.0


def digit_reward(text: str, answer: str) -> float:
    """A verifier for RL tests on untrained models (``--verifier helpers:digit_reward``): the digits in the
    text, so rewards vary within a group and the updates are not zero."""
    return float(sum(c.isdigit() for c in text))
