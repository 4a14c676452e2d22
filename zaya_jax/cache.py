"""Decode state: per-layer K/V and CCA state, stacked over layers to match the layer scan.

Every row is its own sequence: row ``b`` holds ``lengths[b]`` tokens in slots ``0 .. lengths[b] - 1``
(slot = position), and its next token goes to slot ``lengths[b]``. Rows advance independently, so a
slot pool can hold requests at different stages. Slots at or past a row's length may hold stale
values; causality keeps them from ever being attended to, and the next write overwrites them.

A cache of a float narrower than 32 bits (bfloat16, float16) holds the values' bit patterns as unsigned
ints of the same width (``storage_dtype``): XLA:CPU computes an update of a narrow float array in float32,
converting the whole array there and back, so every token's write into a bfloat16 cache rewrote the
whole cache, once per layer (ZAYA1-8B, 40 layers, 1024 slots, batch 1: 128 ms per decode step for the
writes alone, 2.8 ms on the bits; bench/cache_bench.py). Integer updates stay in place.
``KVCache.dtype`` is the values' dtype; ``to_bits`` / ``from_bits`` convert at the model's reads and
writes.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from .config import ZayaConfig


@flax.struct.dataclass
class KVCache:
    """Decode state of all layers.

    k, v:    [layers, batch, kv_heads, max_len, head_dim]  keys after conv/norm/RoPE; values. Heads before
             slots: the layout attention's batched matmuls read (over batch x heads), so a decode step reads
             each layer's slice where it lies instead of copying it out transposed.
    conv:    [layers, batch, conv_state_len, conv_channels] last raw (pre-conv) q/k frames
    v_prev:  [layers, batch, kv_dim // 2]                   delayed-value projection of the last token
    lengths: [batch] int32  tokens held per row (its next slot to write)

    k, v, conv and v_prev are stored in ``storage_dtype(dtype)``; ``dtype`` is their values' dtype.
    """

    k: jax.Array
    v: jax.Array
    conv: jax.Array
    v_prev: jax.Array
    lengths: jax.Array
    dtype: Any = flax.struct.field(pytree_node=False, default=np.dtype(np.float32))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def layer_slices(self):
        """The per-layer part, scanned over by the model."""
        return {"k": self.k, "v": self.v, "conv": self.conv, "v_prev": self.v_prev}


def storage_dtype(dtype) -> np.dtype:
    """The dtype a cache of ``dtype`` values is held in: unsigned ints of the same width for a float
    narrower than 32 bits (updated in place by XLA:CPU), else ``dtype`` itself."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return np.dtype(f"uint{8 * dtype.itemsize}")
    return dtype


def to_bits(values: jax.Array, dtype) -> jax.Array:
    """``values`` cast to ``dtype``, in that cache's storage (bit patterns for a narrow float)."""
    values = values.astype(dtype)
    stored = storage_dtype(dtype)
    return values if stored == values.dtype else jax.lax.bitcast_convert_type(values, stored)


def from_bits(stored: jax.Array, dtype) -> jax.Array:
    """The ``dtype`` values held in ``stored`` (a cache array or a slice of one)."""
    return stored if stored.dtype == np.dtype(dtype) else jax.lax.bitcast_convert_type(stored, dtype)


def init_cache(config: ZayaConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for ``batch`` rows of up to ``max_len`` tokens (prompt + generated) of ``dtype`` values."""
    layers, stored = config.num_hidden_layers, storage_dtype(dtype)  # zero bits are +0.0 in every float format
    return KVCache(
        k=jnp.zeros((layers, batch, config.num_key_value_heads, max_len, config.head_dim), stored),
        v=jnp.zeros((layers, batch, config.num_key_value_heads, max_len, config.head_dim), stored),
        conv=jnp.zeros((layers, batch, config.conv_state_len, config.conv_channels), stored),
        v_prev=jnp.zeros((layers, batch, config.kv_dim // 2), stored),
        lengths=jnp.zeros((batch,), jnp.int32),
        dtype=np.dtype(dtype),
    )
