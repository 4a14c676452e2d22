"""Matmuls against weights narrower than float32 (bfloat16) on XLA:CPU, for a few rows at a time.

XLA:CPU computes a bfloat16 dot by converting its operands to float32 first. For a few rows (a decode
step), writing the float32 copy of a whole weight costs more than the dot's own read of it; reading the
weight in row blocks of at most ``CONVERT_BLOCK_BYTES`` float32 bytes instead keeps each converted block
in cache (ZAYA1-8B's experts: 3.2x faster per expert at batch 1; docs/benchmarks.md). Products are
accumulated in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import backend

CONVERT_BLOCK_BYTES = 8 << 20
MAX_ROWS = 64  # rows of ``x`` up to which the blocked form is used (decode steps, not prefill)


def use_blocks(weights, rows: int) -> bool:
    """Whether ``blocked_matmul`` pays off: a weight narrower than float32, on CPU, for at most ``MAX_ROWS`` rows."""
    return weights.dtype.itemsize < 4 and rows <= MAX_ROWS and backend.platform() == "cpu"


def row_block(rows: int, cols: int) -> int:
    """Rows per block of a ``[rows, cols]`` weight: the largest power of two dividing ``rows`` whose float32
    block fits ``CONVERT_BLOCK_BYTES`` (at least 1)."""
    block = rows & -rows
    while block > 1 and block * cols * 4 > CONVERT_BLOCK_BYTES:
        block //= 2
    return block


def blocked_matmul(x, weights, lead: tuple = ()):
    """``x [..., K] @ weights[lead] [K, N] -> [..., N]`` float32, reading the weight in row blocks.

    ``lead``: the (traced or static) indices of the weight in the leading axes of ``weights`` (the layer
    and expert of a stack), so a block is sliced straight out of the stack.
    """
    K, N = weights.shape[-2:]
    block = row_block(K, N)
    xb = jnp.moveaxis(x.astype(jnp.float32).reshape(*x.shape[:-1], K // block, block), -2, 0)
    ones = (1,) * len(lead)

    def add_block(i, acc):
        w = jax.lax.dynamic_slice(weights, tuple(lead) + (i * block, 0), ones + (block, N)).reshape(block, N)
        return acc + jnp.dot(xb[i], w.astype(jnp.float32))

    return jax.lax.fori_loop(0, K // block, add_block, jnp.zeros((*x.shape[:-1], N), jnp.float32))
