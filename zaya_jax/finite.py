"""Weights holding NaN or Inf: refused, naming the tensor, unless the caller allows them (a model with
one non-finite weight generates garbage without any other sign of trouble)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from . import quant
from .config import ZayaConfig
from .formats import layout
from .formats.hf_reader import CheckpointError
from .model import INFERENCE_COMPILER_OPTIONS

BLOCK_BYTES = 64 << 20  # checked at a time: rows of a tensor, of a global leaf (the embedding)
OVERRIDE = "pass --allow-non-finite (allow_non_finite=True) to use it anyway"


def _refusal(tensor: str, count: int) -> CheckpointError:
    return CheckpointError(f"tensor {tensor} holds {count} non-finite value(s) (NaN or Inf); {OVERRIDE}")


def check_tensor(name: str, array: np.ndarray) -> None:
    """Refuses one tensor read from a checkpoint if it holds NaN or Inf (checked BLOCK_BYTES at a time, so
    the converter's memory stays at about one tensor)."""
    rows = array.reshape(-1, array.shape[-1]) if array.ndim else array.reshape(1, 1)
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    count = sum(int(np.count_nonzero(~np.isfinite(rows[i:i + step]))) for i in range(0, len(rows), step))
    if count:
        raise _refusal(repr(name), count)


def _finite_blocks(x: jax.Array, rows: int) -> jax.Array:
    """Whether each block of ``rows`` along axis 0 is finite (the last block overlaps the one before it).

    ``x * 0`` is 0 for finite values and NaN for NaN and Inf, and a sum carries NaN; a block at a time
    keeps the float32 temporary to one block (``isfinite`` over a whole leaf, or a max or min, which XLA:CPU
    does not always carry a NaN through, would not)."""
    n = x.shape[0]

    def body(i, out):
        block = jax.lax.dynamic_slice_in_dim(x, jnp.minimum(i * rows, n - rows), rows)
        return out.at[i].set(jnp.isfinite(jnp.sum(block.astype(jnp.float32) * 0)))

    count = -(-n // rows)
    return jax.lax.fori_loop(0, count, body, jnp.zeros((count,), bool))


@jax.jit(compiler_options=INFERENCE_COMPILER_OPTIONS)  # else XLA hoists a float32 copy of each leaf out of the loop
def _finite(params: dict) -> dict:
    """Per leaf, per layer for the stacked ``layers`` leaves: whether every value is finite (a quantized
    leaf's scales: its integer values always are, and a weight holding NaN or Inf gives a non-finite scale)."""
    def finite(path, leaf):
        leaf = _checked(leaf)
        if path[0].key == "layers":
            return _finite_blocks(leaf, 1)
        row_bytes = math.prod(leaf.shape[1:]) * leaf.dtype.itemsize
        return jnp.all(_finite_blocks(leaf, max(1, min(leaf.shape[0], BLOCK_BYTES // row_bytes))))

    return jax.tree_util.tree_map_with_path(finite, params, is_leaf=quant.is_quantized)


def _checked(leaf):
    return leaf.scales if quant.is_quantized(leaf) else leaf


@jax.jit
def _count_non_finite(array: jax.Array) -> jax.Array:
    return jnp.sum(~jnp.isfinite(array), dtype=jnp.int32)


def _gather(array) -> np.ndarray:
    """``array`` in full on this process (under a multi-host mesh it may span devices this one cannot read)."""
    return multihost_utils.process_allgather(array, tiled=True)


def check_params(params: dict, config: ZayaConfig) -> None:
    """Refuses a param pytree with NaN or Inf in any weight; the error names the HF tensor and the param."""
    finite = _gather(_finite(params))
    for name, entry, layer in layout.expected_tensors(config):
        if layout.get_path(finite, entry.path)[layer if entry.per_layer else ()]:
            continue
        leaf = _checked(layout.get_path(params, entry.path))
        count = int(_gather(_count_non_finite(leaf[layer] if entry.per_layer else leaf)))
        where = f"param {'/'.join(entry.path)}" + (f", layer {layer}" if entry.per_layer else "")
        raise _refusal(f"{name!r} ({where})", count)
