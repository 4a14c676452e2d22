"""Greedy generation under each test mesh equals unsharded generation token for token."""

import jax
import pytest

import zaya_jax
from helpers import MESHES
from zaya_jax import sharding as shd
from zaya_jax.infer import generate

# Untied head: a random tied model mostly repeats its last token, which would make equality trivial.
CONFIG = zaya_jax.ZayaConfig(
    vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=40, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
    initializer_range=0.2,
)
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14], [1, 2, 3, 4, 5, 6, 7]]
NEW = 8


@pytest.fixture(scope="module")
def reference():
    params = zaya_jax.init(CONFIG, jax.random.key(0))
    tokens = generate(params, CONFIG, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    assert len({t for row in tokens for t in row}) > len(PROMPTS), f"degenerate reference generation {tokens}"
    return params, tokens


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_greedy_generation_equals_unsharded(reference, name):
    params, want = reference
    sizes, rules = MESHES[name]
    mesh = shd.make_mesh(**sizes)
    sharded = shd.shard_params(params, CONFIG, mesh, rules)
    with jax.set_mesh(mesh):
        got = generate(sharded, CONFIG, PROMPTS, max_new_tokens=NEW, stop_token_ids=[]).tokens
    assert got == want
