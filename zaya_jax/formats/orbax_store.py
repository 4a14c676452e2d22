"""The param pytree as an orbax checkpoint, written and read one layer slice at a time.

Format: an orbax ``PyTreeCheckpointer`` checkpoint (no OCDBT, zarr v2, one array per leaf),
restorable with plain orbax. To write it without holding the tree, orbax saves a skeleton of the same
tree with one-element leaves (it writes all the checkpoint metadata and each leaf's zarr metadata);
each leaf's zarr array is then re-created at its real shape, chunked so that a chunk never spans two
layers, and filled slice by slice through tensorstore. Only the slice being written is in memory.
"""

from __future__ import annotations

import itertools
import json
import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from zaya_jax import quant
from zaya_jax.config import ZayaConfig

from . import layout
from .hf_reader import CheckpointError

CHUNK_BYTES = 64 << 20  # upper bound of one zarr chunk
QUANTIZATION_KEY = "quantization"  # config.json of a quantized checkpoint: the ``quant.SCHEMES`` name
QUANTIZED_TENSORS_KEY = "quantized_tensors"  # and each quantized leaf's bits and group size (``Scheme.record``)


def config_scheme(config: dict) -> quant.Scheme | None:
    """The quantization scheme a checkpoint's config.json (a dict) records, or None for float weights."""
    name = config.get(QUANTIZATION_KEY)
    return None if name is None else quant.from_record(name, config.get(QUANTIZED_TENSORS_KEY))


def scheme_entries(scheme: quant.Scheme | None) -> dict:
    """The config.json entries that record ``scheme`` (none for float weights)."""
    return {} if scheme is None else {QUANTIZATION_KEY: scheme.name, QUANTIZED_TENSORS_KEY: scheme.record()}


def _checkpointer() -> ocp.PyTreeCheckpointer:
    return ocp.PyTreeCheckpointer(use_ocdbt=False, use_zarr3=False)


def chunk_shape(shape: tuple[int, ...], itemsize: int, stacked: bool) -> tuple[int, ...]:
    """At most CHUNK_BYTES per chunk; a stacked leaf's chunks hold one layer. Halves the largest axis."""
    chunk = [1, *shape[1:]] if stacked else list(shape)
    while math.prod(chunk) * itemsize > CHUNK_BYTES:
        axis = int(np.argmax(chunk))
        chunk[axis] = -(-chunk[axis] // 2)
    return tuple(chunk)


def _leaf_dir(directory: str, path: layout.ParamPath) -> str:
    return os.path.join(directory, ".".join(path))  # orbax's name for a leaf without OCDBT


def _open_leaf(directory: str, path: layout.ParamPath) -> ts.TensorStore:
    leaf_dir = _leaf_dir(directory, path)
    if not os.path.isdir(leaf_dir):
        raise CheckpointError(f"orbax checkpoint {directory} has no array for param {'/'.join(path)}")
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": leaf_dir}}
    return ts.open(spec, open=True).result()


def create(directory: str, leaves: dict[layout.ParamPath, tuple[tuple[int, ...], np.dtype]]
           ) -> dict[layout.ParamPath, ts.TensorStore]:
    """An orbax checkpoint at ``directory`` (must not exist) of empty arrays; returns them to fill."""
    skeleton: dict = {}
    for path, (shape, dtype) in leaves.items():
        layout.set_path(skeleton, path, np.zeros((1,) * len(shape), dtype))
    _checkpointer().save(os.path.abspath(directory), args=ocp.args.PyTreeSave(skeleton))
    arrays = {}
    for path, (shape, dtype) in leaves.items():
        spec = _open_leaf(directory, path).spec().to_json()
        spec["metadata"].update(shape=list(shape), chunks=list(chunk_shape(shape, np.dtype(dtype).itemsize,
                                                                           path[0] == "layers")))
        spec["store_data_equal_to_fill_value"] = True  # every chunk on disk, so a lost one can be told
        arrays[path] = ts.open(spec, create=True, delete_existing=True).result()
    return arrays


def save_tree(directory: str, tree: dict) -> None:
    """Saves a param pytree (numpy or jax leaves) as an orbax checkpoint, one leaf in host memory at a time."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    leaves = {tuple(k.key for k in path): (tuple(leaf.shape), np.dtype(leaf.dtype)) for path, leaf in flat}
    arrays = create(directory, leaves)
    for path, leaf in flat:
        write_blocks(arrays[tuple(k.key for k in path)], np.asarray(leaf))


class OrbaxWriter:
    """Creates the checkpoint of ``config``'s params in ``dtype`` at ``directory``, the ``quant.QUANTIZED``
    leaves quantized with ``scheme`` when given; ``put`` fills it."""

    def __init__(self, directory: str, config: ZayaConfig, dtype, scheme: quant.Scheme | None = None):
        self.config, self.scheme = config, scheme
        self.arrays = create(directory, {path: (shape, d) for _, path, shape, d in
                                         layout.stored_arrays(config, dtype, scheme)})
        for entry in layout.entries(config):
            fill = layout.fill_value(entry)
            if fill is not None:  # layer slices with no HF tensor
                store = self.arrays[entry.path]
                part = store[: entry.first_layer]
                part.write(np.full(part.shape, fill, store.dtype.numpy_dtype)).result()

    def put(self, entry: layout.Entry, layer: int | None, value: np.ndarray) -> None:
        """Writes one HF tensor already in param layout (``value``: the leaf's layer slice); a quantized leaf's
        values and scales are computed from this tensor alone."""
        parts = {entry.path: value}
        if self.scheme is not None and entry.path in quant.QUANTIZED:
            values, scales = quant.quantize_host(np.asarray(value), quant.QUANTIZED[entry.path],
                                                   self.scheme.of(entry.path))
            parts = {entry.path + ("values",): values, entry.path + ("scales",): scales}
        for path, part in parts.items():
            store = self.arrays[path]
            write_blocks(store[layer] if entry.per_layer else store, np.asarray(part))


def write_blocks(target: ts.TensorStore, value: np.ndarray) -> None:
    """Writes ``value`` into ``target`` a run of whole chunks at a time (cast per block), so that
    tensorstore's staging copy stays at a few chunks instead of a whole tensor."""
    chunks = target.chunk_layout.write_chunk.shape
    split = [a for a in range(value.ndim) if chunks[a] < value.shape[a]]
    dtype = target.dtype.numpy_dtype
    if not split:
        target.write(value.astype(dtype, copy=False)).result()
        return
    axis, step = split[0], chunks[split[0]]
    for start in range(0, value.shape[axis], step):
        index = (slice(None),) * axis + (slice(start, start + step),)
        target[index].write(value[index].astype(dtype, copy=False)).result()


def missing_chunks(leaf_dir: str) -> list[str]:
    """The chunk files a zarr v2 array lacks, sorted. This module (and orbax) write every chunk, zero
    ones included (``fill_value`` null), so a missing one is damage that tensorstore would read as
    zeros. An array with a real ``fill_value`` may leave fill-valued chunks out: not checked."""
    with open(os.path.join(leaf_dir, ".zarray")) as f:
        meta = json.load(f)
    if meta.get("fill_value") is not None:
        return []
    grid = [range(-(-n // c)) for n, c in zip(meta["shape"], meta["chunks"])]
    sep = meta.get("dimension_separator", ".")
    expected = {sep.join(map(str, index)) for index in itertools.product(*grid)} if grid else {"0"}
    present = {os.path.relpath(os.path.join(root, name), leaf_dir).replace(os.sep, "/")
               for root, _, names in os.walk(leaf_dir) for name in names}
    return sorted(expected - present)


def _quantized_leaf(directory: str, path: layout.ParamPath) -> bool:
    return os.path.isdir(_leaf_dir(directory, path + ("values",)))


class OrbaxReader:
    """Reads layer slices of the param leaves of a checkpoint written here.

    ``arrays``: every stored array by its path (a quantized leaf's two under ``path + ("values",)`` and
    ``path + ("scales",)``); ``quantized``: the param paths stored quantized; ``scheme``: their scheme (config.json
    names it), or None."""

    def __init__(self, directory: str, config: ZayaConfig):
        self.config = config
        self.quantized = {e.path for e in layout.entries(config) if _quantized_leaf(directory, e.path)}
        self.scheme = config_scheme(config.to_hf_dict()) if self.quantized else None
        if self.quantized and self.scheme is None:
            raise CheckpointError(f"orbax checkpoint {directory} holds quantized params but config.json does not "
                                  f"name their {QUANTIZATION_KEY!r}")
        self.arrays = {}
        for entry, path, shape, _ in layout.stored_arrays(config, np.float32, self.scheme):
            if self.scheme is not None and (entry.path in quant.QUANTIZED) != (entry.path in self.quantized):
                raise CheckpointError(f"param {'/'.join(entry.path)} of {directory} is "
                                      f"{'not ' if entry.path in quant.QUANTIZED else ''}quantized, unlike a "
                                      f"{self.scheme.name} checkpoint's")
            store = self.arrays[path] = _open_leaf(directory, path)
            if tuple(store.shape) != shape:
                raise CheckpointError(f"param {'/'.join(path)} has shape {tuple(store.shape)}, config.json implies {shape}")
            missing = missing_chunks(_leaf_dir(directory, path))
            if missing:
                raise CheckpointError(
                    f"param {'/'.join(path)} is missing {len(missing)} chunk file(s) of its zarr array "
                    f"(first: {os.path.join(_leaf_dir(directory, path), missing[0])}): the checkpoint "
                    "is damaged or incomplete; convert it again")

    def read(self, entry: layout.Entry, layer: int | None) -> np.ndarray:
        """One layer slice (or a global leaf) in param layout; a quantized one dequantized to ``dtype``."""
        def part(path):
            store = self.arrays[path]
            return (store[layer] if entry.per_layer else store).read().result()

        if entry.path in self.quantized:
            return quant.dequantize_host(part(entry.path + ("values",)), part(entry.path + ("scales",)), self.dtype)
        return part(entry.path)

    @property
    def dtype(self) -> np.dtype:
        """The float params' dtype."""
        return self.arrays[layout.DTYPE_PATH].dtype.numpy_dtype


def restore(directory: str, config: ZayaConfig, dtype=None, shardings: dict | None = None) -> dict:
    """The params as jax arrays cast to ``dtype`` (balancing biases: float32), on the default device or
    placed with ``shardings`` (a pytree like the params; orbax then reads only each process's slices)."""
    reader = OrbaxReader(directory, config)  # validates shapes against config
    target = dtype if dtype is not None else reader.dtype
    single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    restore_args: dict = {}
    for entry, path, _, leaf_dtype in layout.stored_arrays(config, target, reader.scheme):
        sharding = single if shardings is None else layout.get_path(shardings, entry.path)
        if quant.is_quantized(sharding):
            sharding = sharding.values if path[-1] == "values" else sharding.scales
        layout.set_path(restore_args, path, ocp.ArrayRestoreArgs(sharding=sharding, dtype=leaf_dtype))
    tree = _checkpointer().restore(os.path.abspath(directory), args=ocp.args.PyTreeRestore(restore_args=restore_args))
    return quant.from_stored(tree, reader.scheme and reader.scheme.name)
