"""Model directories <-> (config, params): HF checkpoints (native or legacy) and converted ones."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from .config import ZayaConfig


def load(path: str | os.PathLike, *, dtype=None, mesh=None, rules=None) -> tuple[ZayaConfig, dict]:
    """Loads a model directory as ``(config, params)``.

    ``path``: an HF checkpoint directory (native 40-block or legacy 80-layer layout) or a directory
    written by ``zaya convert`` / :func:`save` (orbax). ``dtype`` (e.g. ``jnp.bfloat16``) casts every
    weight but the router's balancing biases, which stay float32; ``None`` keeps the stored dtype.
    ``mesh`` (``sharding.make_mesh``): every leaf is placed straight into its sharded layout under
    ``rules`` (default ``sharding.INFERENCE``), each process reading only the slices its devices hold.
    """
    from zaya_jax import convert

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ZayaConfig.from_pretrained(path)
    if mesh is not None:
        from .sharded_load import load_sharded
        from .sharding import INFERENCE

        return config, load_sharded(path, config, mesh, dtype=dtype, rules=rules or INFERENCE)
    if convert.is_converted(path):
        return config, convert.restore(path, config, dtype)
    params = convert.read_hf(path, config, dtype)
    return config, jax.tree_util.tree_map(jnp.asarray, params)


def save(path: str | os.PathLike, config: ZayaConfig, params: dict, *, force: bool = False) -> None:
    """Saves ``params`` with orbax under ``path/params`` and ``config.json`` beside it; :func:`load` reads it.

    Written to a temporary directory and renamed: an existing ``path`` is replaced only with ``force``.
    """
    from zaya_jax import convert

    convert.save(params, config, os.fspath(path), force=force)
