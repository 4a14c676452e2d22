"""Loading a model directory straight into a sharded layout: each process reads only its slices.

HF checkpoints: every leaf is built with ``jax.make_array_from_callback``; the callback receives the
param-layout index of one device's shard, maps it onto the HF tensor(s) (a transpose is an axis
permutation of the index, per-layer leaves select layers, legacy per-expert tensors select experts)
and reads just that block with safetensors' ``get_slice``. Tensors whose layout change is not a pure
permutation (the small CCA conv kernels) are read whole, then sliced. Converted (orbax) directories
are restored by orbax with the target shardings, which reads only the addressable slices.

Peak host memory per process: about one device shard of the largest leaf.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from safetensors import safe_open

from .config import ZayaConfig
from .formats import converted, layout
from .formats.hf_reader import HFCheckpoint, resolve_dtype
from .sharding import INFERENCE, Rules, param_shardings


def _permutation(entry, config) -> tuple[int, ...] | None:
    """The axis permutation ``entry.to_jax`` applies (``out = a.transpose(perm)``), or None if it is not one.

    Found by probing with a small array of distinct axis sizes and checking the values.
    """
    rank = len(entry.hf_shape(config))
    probe = np.arange(int(np.prod(range(2, rank + 2)))).reshape(tuple(range(2, rank + 2)))
    try:
        out = np.asarray(entry.to_jax(probe, config))
    except ValueError:  # a reshape that needs the real sizes: not a permutation
        return None
    if out.ndim != rank:
        return None
    perm = tuple(int(s) - 2 for s in out.shape)
    if sorted(perm) != list(range(rank)) or not np.array_equal(out, probe.transpose(perm)):
        return None
    return perm


def _read_block(ckpt, item, index: tuple[slice, ...], perm) -> np.ndarray:
    """The block ``index`` (param layout, without the layers axis) of ``item``, read by slices."""
    config = ckpt.config
    if perm is None:
        return np.asarray(item.entry.to_jax(ckpt.read(item), config))[index]
    hf_index = [slice(None)] * len(index)
    for out_axis, in_axis in enumerate(perm):
        hf_index[in_axis] = index[out_axis]
    if len(item.sources) == 1:
        block = _get_slice(ckpt, item.sources[0], tuple(hf_index))
    else:  # legacy: one tensor per expert, stacked on HF axis 0
        first = range(len(item.sources))[hf_index[0]]
        block = np.stack([_get_slice(ckpt, item.sources[e], tuple(hf_index[1:])) for e in first])
    return np.asarray(item.entry.to_jax(block, config))


def _get_slice(ckpt, name: str, index: tuple[slice, ...]) -> np.ndarray:
    with safe_open(ckpt.files[name], framework="numpy") as f:
        return f.get_slice(name)[index]


def _key(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int, int], ...]:
    """A device's index as hashable (start, stop, step) triples."""
    return tuple(s.indices(n) for s, n in zip(index, shape))


def load_hf_sharded(path: str, config: ZayaConfig, shardings: dict, dtype=None) -> dict:
    """An HF checkpoint directory -> params placed with ``shardings`` (a pytree like the params)."""
    ckpt = HFCheckpoint(path, config)  # validates every header first
    target = resolve_dtype(dtype) or ckpt.stored_dtype
    items = {(item.entry.path, item.layer): item for item in ckpt.items}
    params: dict = {}
    for entry, shape, leaf_dtype in layout.leaves(config, target):
        perm = _permutation(entry, config)

        @functools.lru_cache(maxsize=None)  # devices holding the same block (replicas) read it once
        def block(key, entry=entry, shape=shape, leaf_dtype=leaf_dtype, perm=perm):
            index = tuple(slice(*k) for k in key)
            if not entry.per_layer:
                return _read_block(ckpt, items[(entry.path, None)], index, perm).astype(leaf_dtype)
            rows = []
            for layer in range(shape[0])[index[0]]:
                if layer < entry.first_layer:
                    inner = tuple(len(range(n)[s]) for s, n in zip(index[1:], shape[1:]))
                    rows.append(np.full(inner, layout.fill_value(entry), leaf_dtype))
                else:
                    rows.append(_read_block(ckpt, items[(entry.path, layer)], index[1:], perm).astype(leaf_dtype))
            return np.stack(rows)

        sharding = layout.get_path(shardings, entry.path)
        array = jax.make_array_from_callback(shape, sharding, lambda idx, s=shape, b=block: b(_key(idx, s)))
        layout.set_path(params, entry.path, array)
    return params


def load_sharded(path: str, config: ZayaConfig, mesh, *, dtype=None, rules: Rules = INFERENCE) -> dict:
    """A model directory (HF or converted) -> params in their ``rules`` layout over ``mesh``."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (see zaya_jax.sharding.make_mesh), got {type(mesh).__name__}")
    if converted.is_converted(path):
        shardings = param_shardings(config, mesh, rules, converted.quantization(path))
        return converted.restore(path, config, dtype, shardings=shardings)
    return load_hf_sharded(os.fspath(path), config, param_shardings(config, mesh, rules), dtype)
