"""Weights holding NaN or Inf: refused, naming the tensor, unless the caller allows them (a model with
one non-finite weight generates garbage without any other sign of trouble)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from zaya_jax.config import ZayaConfig

from . import layout
from .hf_reader import CheckpointError

OVERRIDE = "pass --allow-non-finite (allow_non_finite=True) to use it anyway"


def _refusal(tensor: str, count: int) -> CheckpointError:
    return CheckpointError(f"tensor {tensor} holds {count} non-finite value(s) (NaN or Inf); {OVERRIDE}")


def check_tensor(name: str, array: np.ndarray) -> None:
    """Refuses one tensor read from a checkpoint if it holds NaN or Inf."""
    count = array.size - int(np.count_nonzero(np.isfinite(array)))
    if count:
        raise _refusal(repr(name), count)


@jax.jit
def _non_finite_counts(params: dict) -> dict:
    """Per leaf: its count of non-finite values, per layer for the stacked ``layers`` leaves (a fused
    reduction: no temporary the size of a leaf; sharded leaves reduce where they lie)."""
    def count(path, leaf):
        stacked = path[0].key == "layers"
        return jnp.sum(~jnp.isfinite(leaf), axis=tuple(range(1 if stacked else 0, leaf.ndim)), dtype=jnp.int32)

    return jax.tree_util.tree_map_with_path(count, params)


def check_params(params: dict, config: ZayaConfig) -> None:
    """Refuses a param pytree with NaN or Inf in any weight; the error names the HF tensor and the param."""
    # Gathered from every process: under a multi-host mesh the counts may span devices this one cannot read.
    counts = multihost_utils.process_allgather(_non_finite_counts(params), tiled=True)
    for name, entry, layer in layout.expected_tensors(config):
        leaf = layout.get_path(counts, entry.path)
        count = int(leaf[layer] if entry.per_layer else leaf)
        if count:
            where = f"param {'/'.join(entry.path)}" + (f", layer {layer}" if entry.per_layer else "")
            raise _refusal(f"{name!r} ({where})", count)
