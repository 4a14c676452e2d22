"""Synthetic ZAYA checkpoints with weight-like values, written one tensor at a time.

For the benchmarks and the tests: a native (or legacy 80-layer) HF checkpoint directory of any
config, release names and shapes, bfloat16 (balancing biases float32), as sharded safetensors +
index + config.json. Nothing but the tensor being written is in memory, so full-size (ZAYA1-8B,
~17 GB) checkpoints can be written on a small host.

Values (deterministic per tensor name and ``seed``): matrices and expert weights have random sign and
mantissa with magnitudes spread over four octaves (std about 0.0275, like an HF init of 0.02); the
embedding (= tied LM head) has std about 1.76, so the token's own embedding stays a sizeable part of
the last residual stream (as in trained models) rather than being drowned by 80 random branches;
norm weights and residual scales are uniform in [0.95, 1.05]; biases small; key temperatures
uniform in [0.5, 1.5]; the router's balancing biases are 0 with the skip route at -1.0 -- the value
transformers forces them to after loading, so both frameworks run the same biases.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from typing import Callable

import ml_dtypes
import numpy as np

from . import dtypes
from .config import ZayaConfig
from .formats import layout, legacy
from .formats.hf_reader import INDEX_FILE
from .memory import peak_rss_bytes

SHARD_BYTES = 4 << 30  # the release uses a few multi-GB shards
_ST_DTYPES = {"bfloat16": "BF16", "float32": "F32"}
W_EXP, EMBED_EXP, DEPTHWISE_EXP, BIAS_EXP = 119, 125, 123, 117  # std ~ 0.0275, 1.76, 0.44, 0.0069

TensorPlan = tuple[str, tuple[int, ...], np.dtype]  # (name, shape, dtype)


def _random_bf16(shape, rng: np.random.Generator, exponent: int) -> np.ndarray:
    """bf16 with random sign and mantissa, |x| in [2^(e-127), 2^(e-123)); std ~ 0.055 * 2^(e-120)."""
    n = int(np.prod(shape))
    bits = rng.bit_generator.random_raw(-(-n // 4)).view(np.uint16)[:n]
    np.bitwise_and(bits, 0x81FF, out=bits)  # sign, two low exponent bits, mantissa
    np.add(bits, np.uint16(exponent << 7), out=bits)
    return bits.view(ml_dtypes.bfloat16).reshape(shape)


def _uniform_bf16(shape, rng, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, shape).astype(np.float32).astype(ml_dtypes.bfloat16)


def synthetic_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """The value of native tensor ``name`` (deterministic in ``seed`` and ``name``)."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    leaf = name.rsplit(".", 1)[-1]
    if name.endswith("balancing_biases"):
        out = np.zeros(shape, np.float32)
        out[-1] = -1.0  # what transformers sets after from_pretrained
        return out
    if name == "model.embed_tokens.weight" or name == "lm_head.weight":
        return _random_bf16(shape, rng, EMBED_EXP)
    if name.endswith("qk_norm.temp"):
        return _uniform_bf16(shape, rng, 0.5, 1.5)
    if name.endswith("conv_qk_depthwise.weight"):
        return _random_bf16(shape, rng, DEPTHWISE_EXP)
    if leaf in ("bias", "hidden_states_bias", "residual_bias", "input_hidden_states_bias"):
        return _random_bf16(shape, rng, BIAS_EXP)
    if len(shape) == 1:  # norm weights, residual and router-state scales
        return _uniform_bf16(shape, rng, 0.95, 1.05)
    return _random_bf16(shape, rng, W_EXP)


def native_tensors(config: ZayaConfig) -> list[TensorPlan]:
    """Every native tensor of a bfloat16 checkpoint, globals first, then block by block (as HF saves)."""
    out = []
    for name, entry, layer in layout.expected_tensors(config):
        dtype = dtypes.leaf_dtype(entry.path, ml_dtypes.bfloat16)
        out.append((layer if layer is not None else -1, name, entry.hf_shape(config), dtype))
    out.sort(key=lambda t: t[0])  # stable: entry order within a block
    return [(name, shape, dtype) for _, name, shape, dtype in out]


def write_sharded(directory: str, tensors: list[TensorPlan], make: Callable[[str], np.ndarray],
                  shard_bytes: int = SHARD_BYTES) -> int:
    """Writes sharded safetensors + index, producing and writing one tensor at a time (``make(name)``).

    The headers are planned from the shapes, so nothing but the tensor being written is in memory.
    Returns the tensor bytes written.
    """
    shards: list[list[TensorPlan]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t[1])) * t[2].itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape)) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype.name], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(os.path.join(directory, file), "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for name, shape, dtype in shard:
                array = np.ascontiguousarray(make(name))
                if array.shape != tuple(shape) or array.dtype != dtype:
                    raise ValueError(f"{name}: made {array.shape} {array.dtype}, planned {tuple(shape)} {dtype}")
                array.tofile(f)
                del array
        total += offset
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    return total


def _legacy_plan(config: ZayaConfig, tensors: list[TensorPlan], seed: int):
    """The legacy tensor plan and maker: same values, legacy names; per-expert tensors are slices of
    the native stacked ones (each stacked tensor is made once, for its experts in turn)."""
    sources = legacy.sources(config)
    shapes = {name: shape for name, shape, _ in tensors}
    plan, origin = [], {}
    for name, shape, dtype in tensors:
        srcs = sources[name]
        for e, src in enumerate(srcs):
            plan.append((src, shape[1:] if len(srcs) > 1 else shape, dtype))
            origin[src] = (name, e if len(srcs) > 1 else None)
    cache: dict = {}

    def make(src):
        name, e = origin[src]
        if e is None:
            return synthetic_tensor(name, shapes[name], seed)
        if cache.get("name") != name:
            cache.update(name=name, value=synthetic_tensor(name, shapes[name], seed))
        return cache["value"][e]

    return plan, make


def write_checkpoint(path: str, config: ZayaConfig, *, seed: int = 0, legacy_layout: bool = False,
                     shard_bytes: int = SHARD_BYTES) -> dict:
    """The synthetic checkpoint of ``config`` at ``path`` (must not exist); returns a summary
    (tensors, bytes, seconds, MB/s, this process's peak RSS)."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; remove it first")
    tensors = native_tensors(config)
    os.makedirs(path)
    t = time.perf_counter()
    if legacy_layout:
        plan, make = _legacy_plan(config, tensors, seed)
        hf_config = dict(config.to_legacy_hf_dict(), dtype="bfloat16")
    else:
        shapes = {name: shape for name, shape, _ in tensors}
        plan, make = tensors, (lambda name: synthetic_tensor(name, shapes[name], seed))
        hf_config = dict(config.to_hf_dict(), dtype="bfloat16")
    nbytes = write_sharded(path, plan, make, shard_bytes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    seconds = time.perf_counter() - t
    return {"path": path, "layers": config.num_hidden_layers, "legacy": legacy_layout, "tensors": len(tensors),
            "bytes": nbytes, "seconds": seconds, "mb_per_s": nbytes / 1e6 / seconds, "peak_rss_bytes": peak_rss_bytes()}
