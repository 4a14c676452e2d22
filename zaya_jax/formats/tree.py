"""The param pytree in host memory, filled or read one HF tensor (one layer slice) at a time."""

from __future__ import annotations

import numpy as np

from zaya_jax import host
from zaya_jax.config import ZayaConfig

from . import layout
from .hf_reader import HFCheckpoint, resolve_dtype


class TreeWriter:
    """Preallocates ``config``'s params in ``dtype`` (numpy); ``put`` fills one slice in place.

    The buffers are aligned (``zaya_jax.host``), so ``host.to_device`` turns them into jax arrays
    without a second copy."""

    def __init__(self, config: ZayaConfig, dtype):
        self.params: dict = {}
        for entry, shape, leaf_dtype in layout.leaves(config, dtype):
            fill = layout.fill_value(entry)
            leaf = host.full(shape, fill, leaf_dtype) if fill is not None else host.empty(shape, leaf_dtype)
            layout.set_path(self.params, entry.path, leaf)

    def put(self, entry: layout.Entry, layer: int | None, value: np.ndarray) -> None:
        leaf = layout.get_path(self.params, entry.path)
        if entry.per_layer:
            leaf[layer] = value
        else:
            leaf[...] = value


class TreeReader:
    """Reads layer slices of an in-memory param pytree (numpy or jax leaves) as numpy arrays."""

    def __init__(self, params: dict, config: ZayaConfig):
        self.params, self.config = params, config

    def read(self, entry: layout.Entry, layer: int | None) -> np.ndarray:
        leaf = layout.get_path(self.params, entry.path)
        return np.asarray(leaf[layer] if entry.per_layer else leaf)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(layout.get_path(self.params, layout.DTYPE_PATH).dtype)


def read_hf(path: str, config: ZayaConfig, dtype=None) -> dict:
    """An HF checkpoint directory (native or legacy) -> param pytree of numpy arrays in host memory.

    ``dtype`` default: the stored one. Peak memory: the params plus one source tensor.
    """
    ckpt = HFCheckpoint(path, config)
    writer = TreeWriter(config, resolve_dtype(dtype) or ckpt.stored_dtype)
    for item, array in ckpt:
        writer.put(item.entry, item.layer, item.entry.to_jax(array, config))
    return writer.params
