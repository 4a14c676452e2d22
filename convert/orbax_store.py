"""The param pytree as an orbax checkpoint, written and read one layer slice at a time.

Format: an orbax ``PyTreeCheckpointer`` checkpoint (no OCDBT, zarr v2, one array per leaf, chunked
with a leading layer axis of 1), restorable with plain orbax. The streaming writer first has orbax
save a placeholder tree of zero-stride arrays of the final shapes and dtypes (orbax writes all the
metadata; the zero chunks compress to almost nothing), then overwrites each leaf slice by slice
through tensorstore. The whole stacked tree is never in memory: only the slice being written.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from zaya_jax.config import ZayaConfig

from . import layout
from .hf_reader import CheckpointError

CHUNK_BYTES = 64 << 20  # upper bound of one zarr chunk; chunks never span layers


def _checkpointer() -> ocp.PyTreeCheckpointer:
    return ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False)


def save_tree(directory: str, tree: dict) -> None:
    """Saves a pytree of numpy/jax arrays with orbax at ``directory`` (which must not exist)."""
    save_args = jax.tree_util.tree_map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES, shard_axes=(0,)), tree)
    _checkpointer().save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree, save_args=save_args))


def _open_leaf(directory: str, path: layout.ParamPath) -> ts.TensorStore:
    leaf_dir = os.path.join(directory, ".".join(path))
    if not os.path.isdir(leaf_dir):
        raise CheckpointError(f"orbax checkpoint {directory} has no array for param {'/'.join(path)}")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": leaf_dir}}
    return ts.open(spec, open=True).result()


class OrbaxWriter:
    """Creates the checkpoint of ``config``'s params in ``dtype`` at ``directory``; ``put`` fills it."""

    def __init__(self, directory: str, config: ZayaConfig, dtype):
        self.config = config
        placeholder: dict = {}
        for entry, shape, leaf_dtype in layout.leaves(config, dtype):
            layout.set_path(placeholder, entry.path, np.broadcast_to(np.zeros((), leaf_dtype), shape))
        save_tree(directory, placeholder)
        self.arrays = {entry.path: _open_leaf(directory, entry.path) for entry in layout.entries(config)}
        for entry in layout.entries(config):
            fill = layout.fill_value(entry)
            if fill is not None:  # layer slices with no HF tensor
                store = self.arrays[entry.path]
                part = store[: entry.first_layer]
                part.write(np.full(part.shape, fill, store.dtype.numpy_dtype)).result()

    def put(self, entry: layout.Entry, layer: int | None, value: np.ndarray) -> None:
        """Writes one HF tensor already in param layout (``value``: the leaf's layer slice)."""
        store = self.arrays[entry.path]
        target = store[layer] if entry.per_layer else store
        target.write(np.asarray(value).astype(store.dtype.numpy_dtype, copy=False)).result()


class OrbaxReader:
    """Reads layer slices of the param leaves of a checkpoint written here."""

    def __init__(self, directory: str, config: ZayaConfig):
        self.config = config
        self.arrays = {entry.path: _open_leaf(directory, entry.path) for entry in layout.entries(config)}
        for entry, shape, _ in layout.leaves(config, np.float32):
            found = tuple(self.arrays[entry.path].shape)
            if found != shape:
                raise CheckpointError(f"param {'/'.join(entry.path)} has shape {found}, config.json implies {shape}")

    def read(self, entry: layout.Entry, layer: int | None) -> np.ndarray:
        store = self.arrays[entry.path]
        return (store[layer] if entry.per_layer else store).read().result()

    @property
    def dtype(self) -> np.dtype:
        return self.arrays[layout.ENTRIES[0].path].dtype.numpy_dtype


def restore(directory: str, config: ZayaConfig, dtype=None, shardings: dict | None = None) -> dict:
    """The params as jax arrays cast to ``dtype`` (balancing biases: float32), on the default device or
    placed with ``shardings`` (a pytree like the params; orbax then reads only each process's slices)."""
    reader = OrbaxReader(directory, config)  # validates shapes against config
    target = dtype if dtype is not None else reader.dtype
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args: dict = {}
    for entry, _, leaf_dtype in layout.leaves(config, target):
        sharding = single if shardings is None else layout.get_path(shardings, entry.path)
        layout.set_path(restore_args, entry.path, ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf_dtype))
    return _checkpointer().restore(
        os.path.abspath(directory), args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
