"""Model directories <-> (config, params): HF checkpoints (native or legacy) and converted ones."""

from __future__ import annotations

import os

import jax
import numpy as np

from . import host, quant
from .config import ZayaConfig
from .finite import check_params
from .formats import converted, layout, tree
from .formats.hf_reader import resolve_dtype
from .formats.orbax_store import OrbaxReader
from .sharded_load import load_sharded
from .sharding import INFERENCE

BLOCK_BYTES = 64 << 20  # rows of a global leaf (the embedding) read at a time


def load(path: str | os.PathLike, *, dtype=None, mesh=None, rules=None,
         allow_non_finite: bool = False) -> tuple[ZayaConfig, dict]:
    """Loads a model directory as ``(config, params)``.

    ``path``: an HF checkpoint directory (native 40-block or legacy 80-layer layout) or a directory
    written by ``zaya convert`` / :func:`save` (orbax). ``dtype`` (e.g. ``jnp.bfloat16``) casts every
    weight but the router's balancing biases, which stay float32; ``None`` keeps the stored dtype.
    ``mesh`` (``sharding.make_mesh``): every leaf is placed straight into its sharded layout under
    ``rules`` (default ``sharding.INFERENCE``), each process reading only the slices its devices hold.
    A weight holding NaN or Inf is refused (``CheckpointError`` naming the tensor) unless ``allow_non_finite``.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model directory {path} does not exist")
    config = ZayaConfig.from_pretrained(path)
    if mesh is not None:
        params = load_sharded(path, config, mesh, dtype=dtype, rules=rules or INFERENCE)
    elif converted.is_converted(path):
        params = _restore_host(path, config, dtype)
    else:  # preallocated aligned buffers, filled tensor by tensor
        params = jax.tree_util.tree_map(host.to_device, tree.read_hf(path, config, dtype))
    if not allow_non_finite:
        check_params(params, config)
    return config, params


def _restore_host(path: str, config: ZayaConfig, dtype) -> dict:
    """A converted directory's params on the default device, held once: each array is preallocated in its
    final dtype (aligned, see ``host``), filled block by block from the orbax arrays (casting per block)
    and handed to jax without a copy. Peak host memory: the params plus one block (a layer slice).
    Quantized leaves keep their stored values and scales (``dtype`` casts the float leaves)."""
    reader = OrbaxReader(os.path.join(path, converted.PARAMS_DIR), config)  # validates shapes against config
    target = resolve_dtype(dtype) or reader.dtype
    params: dict = {}
    for entry, array_path, shape, leaf_dtype in layout.stored_arrays(config, target, reader.scheme):
        store = reader.arrays[array_path]
        buf = host.empty(shape, leaf_dtype)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * store.dtype.numpy_dtype.itemsize
        step = 1 if entry.per_layer else max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])  # tensorstore does not clip slices
            buf[start:stop] = store[start:stop].read().result()
        layout.set_path(params, array_path, host.to_device(buf))
    return quant.from_stored(params, reader.scheme and reader.scheme.name)


def save(path: str | os.PathLike, config: ZayaConfig, params: dict, *, force: bool = False) -> None:
    """Saves ``params`` with orbax under ``path/params`` and ``config.json`` beside it; :func:`load` reads it.

    Written to a temporary directory and renamed: an existing ``path`` is replaced only with ``force``.
    """
    from zaya_jax import convert

    convert.save(params, config, os.fspath(path), force=force)
