"""Matmuls against weights narrower than float32 (bfloat16) on XLA:CPU, for a few rows at a time.

XLA:CPU computes a bfloat16 dot by converting its operands to float32 first. For a few rows (a decode
step), writing the float32 copy of a whole weight costs more than the dot's own read of it; reading the
weight in row blocks of at most ``CONVERT_BLOCK_BYTES`` float32 bytes instead keeps each converted block
in cache (ZAYA1-8B's experts: 3.2x faster per expert at batch 1; docs/benchmarks.md). Products are
accumulated in float32. Quantized weights (``zaya_jax.quant``) are read the same way: each block's integers
are converted in cache, per-channel scales multiply the sum, grouped scales each block's rows. The LM head
is read in blocks of its vocabulary (``blocked_logits``), each giving a block of the logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import backend, quant
from .mesh import varying, varying_axes

CONVERT_BLOCK_BYTES = 8 << 20
MAX_ROWS = 64  # rows of ``x`` up to which the blocked form is used (decode steps, not prefill)


def use_blocks(weights, rows: int) -> bool:
    """Whether ``blocked_matmul`` pays off: a weight narrower than float32, on CPU, for at most ``MAX_ROWS`` rows."""
    return weights.dtype.itemsize < 4 and rows <= MAX_ROWS and backend.platform() == "cpu"


def fitting_rows(cols: int) -> int:
    """The most rows of ``cols`` columns, a power of two, whose float32 block fits ``CONVERT_BLOCK_BYTES``
    (at least 1)."""
    rows = 1
    while 2 * rows * cols * 4 <= CONVERT_BLOCK_BYTES:
        rows *= 2
    return rows


def row_block(rows: int, cols: int) -> int:
    """Rows per block of a ``[rows, cols]`` weight: the largest power of two dividing ``rows`` whose float32
    block fits ``CONVERT_BLOCK_BYTES`` (at least 1)."""
    return min(rows & -rows, fitting_rows(cols))


def _block_scales(scales, lead: tuple, start, block: int, rows: int):
    """The grouped scales of weight rows ``[start, start + block)``: ``[n, 1, N]`` for n groups in the block
    (``[1, 1, N]`` when a group spans several blocks); groups and blocks are powers of two."""
    groups, N = scales.shape[-2:]
    group = rows // groups
    n = max(1, block // group)
    ones = (1,) * len(lead)
    s = jax.lax.dynamic_slice(scales, tuple(lead) + (start // group, 0), ones + (n, N))
    return s.reshape(n, 1, N)


def blocked_matmul(x, weights, lead: tuple = ()):
    """``x [..., K] @ weights[lead] [K, N] -> [..., N]`` float32, reading the weight in row blocks.

    ``lead``: the (traced or static) indices of the weight in the leading axes of ``weights`` (the layer
    and expert of a stack), so a block is sliced straight out of the stack. ``weights`` may be quantized.
    """
    K, N = weights.shape[-2:]
    block = row_block(K, N)
    xb = jnp.moveaxis(x.astype(jnp.float32).reshape(*x.shape[:-1], K // block, block), -2, 0)
    ones = (1,) * len(lead)
    quantized = quant.is_quantized(weights)
    values = weights.values if quantized else weights
    grouped = quantized and not quant.per_channel(weights)

    def add_block(i, acc):
        w = jax.lax.dynamic_slice(values, tuple(lead) + (i * block, 0), ones + (block, N)).reshape(block, N)
        w = w.astype(jnp.float32)
        if grouped:
            s = _block_scales(weights.scales, lead, i * block, block, K)
            w = (w.reshape(s.shape[0], -1, N) * s).reshape(block, N)
        return acc + jnp.dot(xb[i], w)

    # Inside shard_map the loop's carry must vary over the mesh axes its body's products vary over.
    acc = varying(jnp.zeros((*x.shape[:-1], N), jnp.float32), varying_axes(x) | varying_axes(values))
    y = jax.lax.fori_loop(0, K // block, add_block, acc)
    if quantized and not grouped:
        y = y * jax.lax.dynamic_slice(weights.scales, tuple(lead) + (0, 0), ones + (1, N)).reshape(N)
    return y


def blocked_logits(x, head, tied: bool):
    """``x [..., K] @ head -> [..., V]`` float32 for a quantized LM head: the embedding ``[V, K]`` when ``tied``,
    else ``[K, V]``, read in blocks of the vocabulary, each giving a block of the output columns.

    The blocks need not divide ``V``: the entries past the last whole block are one shorter block. (ZAYA1-8B's
    vocabulary, 262,272 = 2^7 x 2,049, would otherwise be read 128 entries at a time, and the loop's own
    cost per block would outweigh the products.)
    """
    axis = 0 if tied else 1
    V, K = head.shape[axis], head.shape[1 - axis]
    block = min(V, fitting_rows(K))
    whole, rest = divmod(V, block)
    # A 2-D product: XLA:CPU runs ``[1, 1, K]`` against a block 2.5x slower than ``[1, K]``.
    xf = x.astype(jnp.float32).reshape(-1, K)

    def product(start, size):
        part = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, axis), head)
        return jnp.einsum("rk,vk->rv" if tied else "rk,kv->rv", xf, quant.dequantize(part, jnp.float32))

    def one_block(i, out):
        return jax.lax.dynamic_update_slice_in_dim(out, product(i * block, block), i * block, axis=1)

    out = jax.lax.fori_loop(0, whole, one_block, jnp.zeros((xf.shape[0], V), jnp.float32))
    if rest:
        out = out.at[:, whole * block :].set(product(whole * block, rest))
    return out.reshape(*x.shape[:-1], V)
