"""The embedded default model used when a command is given no model directory.

There is no trained default model yet: this is a small random-weight ZAYA (the real architecture at
toy width), built deterministically by the package itself. Its outputs are meaningless text; it is
there so every command runs offline on a fresh machine.
"""

from __future__ import annotations

import jax

from .config import ZayaConfig
from .model import init

DEFAULT_CONFIG = ZayaConfig(
    vocab_size=1024,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=128,
    num_experts=16,
    router_hidden_size=32,
    max_position_embeddings=4096,
    bos_token_id=2,
    eos_token_id=(106,),
)
DESCRIPTION = "embedded default: a small random-weight ZAYA (4 layers, 16 experts; no trained weights yet)"


def default_model(dtype=None) -> tuple[ZayaConfig, dict]:
    """``(config, params)`` of the embedded default model (seed 0)."""
    import jax.numpy as jnp

    return DEFAULT_CONFIG, init(DEFAULT_CONFIG, jax.random.key(0), dtype or jnp.float32)
