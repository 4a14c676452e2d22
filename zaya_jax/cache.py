"""Decode state: per-layer K/V and CCA state, stacked over layers to match the layer scan.

Every row is its own sequence: row ``b`` holds ``lengths[b]`` tokens in slots ``0 .. lengths[b] - 1``
(slot = position), and its next token goes to slot ``lengths[b]``. Rows advance independently, so a
slot pool can hold requests at different stages. Slots at or past a row's length may hold stale
values; causality keeps them from ever being attended to, and the next write overwrites them.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from .config import ZayaConfig


@flax.struct.dataclass
class KVCache:
    """Decode state of all layers.

    k, v:    [layers, batch, max_len, kv_heads, head_dim]  keys after conv/norm/RoPE; values
    conv:    [layers, batch, conv_state_len, conv_channels] last raw (pre-conv) q/k frames
    v_prev:  [layers, batch, kv_dim // 2]                   delayed-value projection of the last token
    lengths: [batch] int32  tokens held per row (its next slot to write)
    """

    k: jax.Array
    v: jax.Array
    conv: jax.Array
    v_prev: jax.Array
    lengths: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def layer_slices(self):
        """The per-layer part, scanned over by the model."""
        return {"k": self.k, "v": self.v, "conv": self.conv, "v_prev": self.v_prev}


def init_cache(config: ZayaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated)."""
    layers = config.num_hidden_layers
    return KVCache(
        k=jnp.zeros((layers, batch, max_len, config.num_key_value_heads, config.head_dim), dtype),
        v=jnp.zeros((layers, batch, max_len, config.num_key_value_heads, config.head_dim), dtype),
        conv=jnp.zeros((layers, batch, config.conv_state_len, config.conv_channels), dtype),
        v_prev=jnp.zeros((layers, batch, config.kv_dim // 2), dtype),
        lengths=jnp.zeros((batch,), jnp.int32),
    )
