"""Reads an HF ZAYA checkpoint directory, native or legacy layout, as a stream of native tensors.

The whole checkpoint is validated from the safetensors headers before any tensor data is read:
missing, unexpected, misshapen or unsupported-dtype tensors, truncated or corrupt files, an index
naming a missing shard. Tensors are then read one at a time with safetensors' numpy path (no torch);
each file is opened per tensor, so no memory map keeps already-read pages resident. Every problem is
reported with the tensor, key or file it concerns.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterator

import numpy as np
from safetensors import safe_open

from zaya_jax import dtypes
from zaya_jax.config import ZayaConfig, is_legacy_dict

from . import layout, legacy

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as a ZAYA model; the message names the tensor, key or file."""


def resolve_dtype(dtype) -> np.dtype | None:
    """``dtypes.resolve`` with its error as a CheckpointError (a dtype asked of a checkpoint)."""
    try:
        return dtypes.resolve(dtype)
    except ValueError as e:
        raise CheckpointError(str(e)) from e


def tensor_files(path: str) -> dict[str, str]:
    """Maps each tensor name to the safetensors file holding it (sharded index or one file)."""
    index = os.path.join(path, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
        files = {}
        for name, shard in weight_map.items():
            file = os.path.join(path, shard)
            if not os.path.exists(file):
                raise CheckpointError(f"{INDEX_FILE} maps tensor {name!r} to missing shard {shard!r}")
            files[name] = file
        return files
    single = os.path.join(path, SINGLE_FILE)
    if os.path.exists(single):
        return {name: single for name in _headers(single)}
    raise CheckpointError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")


def _headers(file: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype string) from a file's header; rejects truncated/corrupt files."""
    try:
        with safe_open(file, framework="numpy") as f:
            out = {}
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
            return out
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"cannot read safetensors file {file}: {e}") from e


@dataclasses.dataclass(frozen=True)
class Item:
    """One native HF tensor to read: its layout entry, block, source tensor(s) and stored dtype."""

    name: str
    entry: layout.Entry
    layer: int | None
    sources: tuple[str, ...]  # several: per-expert legacy tensors stacked on a new axis 0
    shape: tuple[int, ...]  # native HF shape
    dtype: np.dtype  # stored dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class HFCheckpoint:
    """An HF checkpoint directory (native 40-block or legacy 80-layer layout), validated on opening.

    ``items`` lists every native tensor; ``read(item)`` returns it in native HF layout and stored dtype.
    """

    def __init__(self, path: str, config: ZayaConfig):
        self.path, self.config = path, config
        with open(os.path.join(path, "config.json")) as f:
            self.legacy = is_legacy_dict(json.load(f))
        self.files = tensor_files(path)
        per_file = {file: _headers(file) for file in sorted(set(self.files.values()))}
        headers = {}
        for name, file in self.files.items():
            if name not in per_file[file]:
                raise CheckpointError(f"{INDEX_FILE} maps tensor {name!r} to {os.path.basename(file)}, which lacks it")
            headers[name] = per_file[file][name]
        self.items = self._plan(headers)

    def _plan(self, headers: dict[str, tuple[tuple[int, ...], str]]) -> list[Item]:
        config = self.config
        expected = list(layout.expected_tensors(config))
        sources = legacy.sources(config) if self.legacy else {name: (name,) for name, _, _ in expected}
        known = {s for srcs in sources.values() for s in srcs}
        if config.tie_word_embeddings:
            known.add("lm_head.weight")  # tied: a stored head is the embedding again; ignored
        missing = sorted(s for srcs in sources.values() for s in srcs if s not in self.files)
        if missing:
            raise CheckpointError(f"checkpoint {self.path} is missing tensor(s): {_preview(missing)}")
        unexpected = sorted(set(self.files) - known)
        if unexpected:
            raise CheckpointError(
                f"checkpoint {self.path} has unexpected tensor(s): {_preview(unexpected)}{self._layer_hint(unexpected)}"
            )
        items = []
        for name, entry, layer in expected:
            want = entry.hf_shape(config)
            srcs = sources[name]
            each = want[1:] if len(srcs) > 1 else want
            dtypes = set()
            for src in srcs:
                shape, dtype = headers[src]
                if shape != each:
                    raise CheckpointError(f"tensor {src!r} has shape {shape}, config.json implies {each}")
                if dtype not in _SAFETENSORS_DTYPES:
                    raise CheckpointError(
                        f"tensor {src!r} has unsupported dtype {dtype}; supported: {sorted(_SAFETENSORS_DTYPES)}"
                    )
                dtypes.add(dtype)
            if len(dtypes) > 1:
                raise CheckpointError(f"the per-expert tensors of {name!r} mix dtypes {sorted(dtypes)}")
            items.append(Item(name, entry, layer, srcs, want, resolve_dtype(_SAFETENSORS_DTYPES[dtypes.pop()])))
        return items

    def _layer_hint(self, names: list[str]) -> str:
        layers = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
        if not layers:
            return ""
        count = 2 * self.config.num_hidden_layers if self.legacy else self.config.num_hidden_layers
        return f" (config.json says num_hidden_layers={count}, the weights reach layer {max(layers)})"

    @property
    def stored_dtype(self) -> np.dtype:
        """The checkpoint's dtype: that of its embedding."""
        return self.items[0].dtype

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self.items)

    def read(self, item: Item) -> np.ndarray:
        """``item`` in native HF layout and its stored dtype (legacy experts stacked on axis 0)."""
        if len(item.sources) == 1:
            return self._read_one(item.sources[0])
        out = np.empty(item.shape, item.dtype)
        for e, src in enumerate(item.sources):
            out[e] = self._read_one(src)
        return out

    def _read_one(self, name: str) -> np.ndarray:
        file = self.files[name]
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {file}: {e}") from e

    def __iter__(self) -> Iterator[tuple[Item, np.ndarray]]:
        for item in self.items:
            yield item, self.read(item)


def _preview(names: list[str], limit: int = 8) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
