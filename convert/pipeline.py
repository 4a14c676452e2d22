"""Whole conversions: HF checkpoint -> converted directory, params -> HF checkpoint, and back.

A converted directory holds ``params/`` (an orbax checkpoint of the stacked param pytree),
``config.json`` (native schema), a ``zaya_convert.json`` manifest and the tokenizer files and chat
template of the source. Every output is built in a temporary sibling directory and renamed into place
at the end (``staging``), so a failed run leaves nothing behind and an existing output is only replaced
on request.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import numpy as np
from tqdm import tqdm

from zaya_jax import dtypes, quant
from zaya_jax.config import ZayaConfig
from zaya_jax.finite import check_tensor
from zaya_jax.formats import layout
from zaya_jax.formats.converted import PARAMS_DIR, is_converted
from zaya_jax.formats.hf_reader import CheckpointError, HFCheckpoint, resolve_dtype
from zaya_jax.formats.orbax_store import (
    QUANTIZATION_KEY,
    QUANTIZED_TENSORS_KEY,
    OrbaxReader,
    OrbaxWriter,
    save_tree,
    scheme_entries,
)
from zaya_jax.formats.tree import TreeReader
from zaya_jax.memory import peak_rss_bytes

from .hf_writer import DEFAULT_MAX_SHARD_BYTES, Tensor, write_safetensors
from .staging import staged

MANIFEST = "zaya_convert.json"
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "chat_template.jinja", "chat_template.json", "generation_config.json",
)


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a conversion did: tensors and bytes moved, wall time, the process's peak resident memory."""

    tensors: int
    bytes: int
    seconds: float
    peak_rss_bytes: int

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        return (f"{self.tensors} tensors, {self.bytes / 2**30:.2f} GiB in {self.seconds:.1f} s "
                f"({self.mb_per_s:.0f} MB/s); peak RSS {self.peak_rss_bytes / 2**30:.2f} GiB")


class _Meter:
    """A progress bar over bytes that ends as a Summary."""

    def __init__(self, total_bytes: int, desc: str, progress: bool):
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                        disable=not progress, leave=False)
        self.start, self.tensors, self.bytes = time.perf_counter(), 0, 0

    def step(self, nbytes: int) -> None:
        self.tensors += 1
        self.bytes += nbytes
        self.bar.update(nbytes)

    def close(self) -> Summary:
        self.bar.close()
        return Summary(self.tensors, self.bytes, time.perf_counter() - self.start, peak_rss_bytes())




def _check_paths(src: str, dst: str) -> None:
    if not os.path.isdir(src):
        raise FileNotFoundError(f"source directory {src} does not exist")
    s, d = os.path.realpath(src), os.path.realpath(dst)
    if d == s or d.startswith(s + os.sep) or s.startswith(d + os.sep):
        raise CheckpointError(f"destination {dst} must lie outside the source {src} (and not contain it)")


def _write_config(directory: str, config: ZayaConfig, dtype: np.dtype, quantization: str | None = None) -> None:
    """config.json: the native schema, the float params' ``dtype`` and, for quantized weights, their scheme
    (its name and each quantized leaf's bits and group size)."""
    data = dict(config.to_hf_dict(), dtype=np.dtype(dtype).name)
    data.pop(QUANTIZATION_KEY, None)
    data.pop(QUANTIZED_TENSORS_KEY, None)
    data.update(scheme_entries(quant.scheme(quantization)))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(data, f, indent=2)


def copy_assets(src: str | None, dst: str) -> list[str]:
    """Copies the tokenizer and chat-template files that exist in ``src`` into ``dst``; returns their names."""
    copied = []
    for name in ASSET_FILES:
        if src is not None and os.path.isfile(os.path.join(src, name)):
            shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
            copied.append(name)
    return copied


def _fill(ckpt: HFCheckpoint, writer, meter: _Meter, allow_non_finite: bool = True) -> Summary:
    """Streams every tensor of ``ckpt`` into ``writer`` (an OrbaxWriter) in param layout; a tensor with NaN
    or Inf is refused unless ``allow_non_finite``."""
    for item, array in ckpt:
        if not allow_non_finite:
            check_tensor(item.name, array)
        writer.put(item.entry, item.layer, item.entry.to_jax(array, ckpt.config))
        del array
        meter.step(item.nbytes)
    return meter.close()


def convert(src: str, dst: str, *, dtype=None, quantize: str | None = None, force: bool = False,
            progress: bool = True, allow_non_finite: bool = False) -> Summary:
    """HF checkpoint directory (native or legacy layout) -> converted directory ``dst``.

    Streams tensor by tensor into the orbax checkpoint: memory stays at about one source tensor
    whatever the model size. ``dtype`` default: the stored one (``balancing_biases``: float32).
    ``quantize`` (``"int8"`` / ``"int4"``, ``zaya_jax.quant``): the ``quant.QUANTIZED`` weights are stored
    quantized, each tensor's scales computed from that tensor alone; the other leaves in ``dtype``.
    A tensor holding NaN or Inf is refused (CheckpointError naming it) unless ``allow_non_finite``.
    """
    scheme = quant.scheme(quantize)
    src, dst = os.fspath(src), os.fspath(dst)
    _check_paths(src, dst)
    config = ZayaConfig.from_pretrained(src)
    ckpt = HFCheckpoint(src, config)  # validates every header before anything is written
    target = resolve_dtype(dtype) or ckpt.stored_dtype
    with staged(dst, force) as tmp:
        meter = _Meter(ckpt.nbytes, "converting", progress)
        writer = OrbaxWriter(os.path.join(tmp, PARAMS_DIR), config, target, scheme)
        summary = _fill(ckpt, writer, meter, allow_non_finite)
        _write_config(tmp, config, target, quantize)
        assets = copy_assets(src, tmp)
        manifest = {"source": os.path.abspath(src), "layout": "legacy" if ckpt.legacy else "native",
                    "dtype": target.name, QUANTIZATION_KEY: scheme and scheme.name, "assets": assets, **dataclasses.asdict(summary)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
    return summary


def save(params: dict, config: ZayaConfig, dst: str, *, force: bool = False) -> None:
    """Saves an in-memory param pytree (float or quantized) as a converted directory (orbax + config.json)."""
    dtype = np.dtype(layout.get_path(params, layout.DTYPE_PATH).dtype)
    with staged(os.fspath(dst), force) as tmp:
        save_tree(os.path.join(tmp, PARAMS_DIR), params)
        _write_config(tmp, config, dtype, quant.scheme_of(params))


def _param_tensors(reader, config: ZayaConfig) -> list[Tensor]:
    """Every native HF tensor of a param reader (TreeReader or OrbaxReader), globals then by layer."""
    tensors = []
    for name, entry, layer in sorted(layout.expected_tensors(config), key=lambda t: -1 if t[2] is None else t[2]):
        itemsize = dtypes.leaf_dtype(entry.path, reader.dtype).itemsize
        nbytes = int(np.prod(entry.hf_shape(config))) * itemsize
        tensors.append(Tensor(name, nbytes, lambda e=entry, i=layer: e.to_hf(reader.read(e, i), config)))
    return tensors


def _write_hf(tensors: list[Tensor], config: ZayaConfig, dtype: np.dtype, dst: str, assets_src: str | None,
              force: bool, max_shard_bytes: int, progress: bool) -> Summary:
    with staged(dst, force) as tmp:
        meter = _Meter(sum(t.nbytes for t in tensors), "exporting", progress)
        write_safetensors(tmp, tensors, max_shard_bytes, on_tensor=lambda t: meter.step(t.nbytes))
        summary = meter.close()
        _write_config(tmp, config, dtype)
        copy_assets(assets_src, tmp)
    return summary


def export(src: str, dst: str, *, force: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           progress: bool = True, dequantize: bool = False) -> Summary:
    """A converted directory (or any HF checkpoint, legacy included) -> native HF checkpoint ``dst``.

    Sharded safetensors (``max_shard_bytes`` each) + index + config.json, loadable by
    ``transformers.ZayaForCausalLM.from_pretrained``. Memory: one shard. A quantized directory is refused
    (CheckpointError) unless ``dequantize``: its weights are then written dequantized, in its float dtype.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    _check_paths(src, dst)
    config = ZayaConfig.from_pretrained(src)
    if is_converted(src):
        reader = OrbaxReader(os.path.join(src, PARAMS_DIR), config)
        if reader.scheme is not None and not dequantize:
            raise CheckpointError(f"{src} holds {reader.scheme.name}-quantized weights, which transformers cannot "
                                  f"load; pass --dequantize (dequantize=True) to export them dequantized to "
                                  f"{reader.dtype.name}")
        tensors, dtype = _param_tensors(reader, config), reader.dtype
    else:
        ckpt = HFCheckpoint(src, config)
        tensors = [Tensor(item.name, item.nbytes, lambda i=item: ckpt.read(i)) for item in ckpt.items]
        dtype = ckpt.stored_dtype
    return _write_hf(tensors, config, dtype, dst, src, force, max_shard_bytes, progress)


def save_hf(params: dict, config: ZayaConfig, dst: str, *, force: bool = False,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Summary:
    """An in-memory float param pytree -> native HF checkpoint ``dst`` (as ``export``)."""
    quant.require_float(params, "save_hf")
    reader = TreeReader(params, config)
    return _write_hf(_param_tensors(reader, config), config, reader.dtype, os.fspath(dst), None, force,
                     max_shard_bytes, progress=False)
