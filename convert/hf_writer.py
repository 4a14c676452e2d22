"""Writes native-layout HF tensors as sharded safetensors plus the index that transformers reads.

Shards are planned from the tensor sizes before any data is read, so only the shard being written
is in memory (one tensor larger than the shard limit gets a shard of its own).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import numpy as np
from safetensors.numpy import save_file

from zaya_jax.formats.hf_reader import INDEX_FILE, SINGLE_FILE

DEFAULT_MAX_SHARD_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class Tensor:
    """A tensor to write: its HF name, size, and how to read it (native HF layout)."""

    name: str
    nbytes: int
    read: Callable[[], np.ndarray]


def plan_shards(tensors: list[Tensor], max_shard_bytes: int) -> list[list[Tensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (or one tensor)."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(directory: str, tensors: list[Tensor], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      on_tensor: Callable[[Tensor], None] = lambda t: None) -> None:
    """Writes ``tensors`` into ``directory``: one ``model.safetensors``, or shards and their index."""
    shards = plan_shards(tensors, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for t in shard:
            arrays[t.name] = np.ascontiguousarray(t.read())
            weight_map[t.name] = file
            on_tensor(t)
        save_file(arrays, os.path.join(directory, file), metadata={"format": "pt"})
        del arrays
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)}, "weight_map": weight_map}
        with open(os.path.join(directory, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
