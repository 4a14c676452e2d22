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


def digit_reward(text: str, answer: str) -> float:
    """A verifier for RL tests on untrained models (``--verifier helpers:digit_reward``): the digits in the
    text, so rewards vary within a group and the updates are not zero."""
    return float(sum(c.isdigit() for c in text))
