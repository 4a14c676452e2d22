"""Reads an HF ZAYA checkpoint directory (native layout) into the stacked param pytree.

Tensors are read one at a time with safetensors' numpy path (no torch) and written into preallocated
stacked leaves in the target dtype, so peak host memory is the output plus one source tensor. Every
problem is reported with the tensor, key or file it concerns.
"""

from __future__ import annotations

import json
import os
from typing import Iterator

import ml_dtypes
import numpy as np
from safetensors import safe_open

from zaya_jax.config import ZayaConfig

from . import layout

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SUPPORTED_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a ZAYA model; the message names the tensor, key or file."""


def resolve_dtype(dtype) -> np.dtype:
    if dtype is None:
        return None
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}.get(name, name)
    if name not in SUPPORTED_DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; choose one of {sorted(SUPPORTED_DTYPES)}")
    return np.dtype(SUPPORTED_DTYPES[name])


def tensor_files(path: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file holding it (sharded index or one file)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
        files = {}
        for name, shard in weight_map.items():
            file = os.path.join(path, shard)
            if not os.path.exists(file):
                raise CheckpointError(f"{INDEX_FILE} maps tensor {name!r} to missing shard {shard!r}")
            files[name] = file
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return {name: single for name in _keys(single)}
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")


def _keys(file: str) -> list[str]:
    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e


def iter_tensors(files: dict[str, str], names: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (name, array) for ``names``, opening each shard once, in shard order."""
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(files[name], []).append(name)
    for file, file_names in by_file.items():
        try:
            with safe_open(file, framework="numpy") as f:
                for name in file_names:
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor(s) from {file}: {e}") from e


def read_native(path: str, config: ZayaConfig, dtype=None) -> dict:
    """Native-layout HF tensors -> param pytree of numpy arrays (``dtype`` default: the stored one)."""
    files = tensor_files(path)
    target = resolve_dtype(dtype)
    expected = {name: (entry, layer) for name, entry, layer in layout.expected_tensors(config)}
    ignored = set()
    if config.tie_word_embeddings and "lm_head.weight" in files:
        ignored.add("lm_head.weight")  # tied: the embedding is the head
    missing = sorted(set(expected) - set(files))
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensor(s): {_preview(missing)}")
    unexpected = sorted(set(files) - set(expected) - ignored)
    if unexpected:
        raise CheckpointError(f"checkpoint {path} has unexpected tensor(s): {_preview(unexpected)}")

    params: dict = {}
    for name, array in iter_tensors(files, list(expected)):
        entry, layer = expected[name]
        want = entry.hf_shape(config)
        if tuple(array.shape) != want:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(array.shape)}, config expects {want}")
        if target is None:  # keep the stored dtype, if it is one we compute in
            try:
                target = resolve_dtype(array.dtype.name)
            except CheckpointError as e:
                raise CheckpointError(f"tensor {name!r}: {e}") from e
        leaf_dtype = np.float32 if entry.path in layout.FLOAT32_PATHS else target
        leaf = _leaf(params, entry, config, leaf_dtype)
        value = entry.to_jax(array, config).astype(leaf_dtype)
        if entry.per_layer:
            leaf[layer] = value
        else:
            leaf[...] = value
    return params


def _leaf(params: dict, entry: layout.Entry, config: ZayaConfig, dtype) -> np.ndarray:
    """The preallocated stacked leaf of ``entry``, created on first use."""
    try:
        return layout.get_path(params, entry.path)
    except KeyError:
        shape = layout.param_shape(entry, config)
        fill = layout.fill_value(entry)
        leaf = np.full(shape, fill, dtype) if fill is not None else np.empty(shape, dtype)
        layout.set_path(params, entry.path, leaf)
        return leaf


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
