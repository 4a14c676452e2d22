"""Loading a model directory into (config, params)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from .config import ZayaConfig


def load(path: str | os.PathLike, *, dtype=None, mesh=None) -> tuple[ZayaConfig, dict]:
    """Loads an HF checkpoint directory (native layout) as ``(config, params)``.

    ``dtype`` (e.g. ``jnp.bfloat16``) casts every weight but the router's balancing biases, which stay
    float32; ``None`` keeps the stored dtype.
    """
    from zaya_jax.convert import read_native

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    if mesh is not None:
        raise NotImplementedError("sharded loading (mesh=...) is not implemented yet")
    config = ZayaConfig.from_pretrained(path)
    params = read_native(path, config, dtype)
    return config, jax.tree_util.tree_map(jnp.asarray, params)
