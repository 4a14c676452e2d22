"""Whether a converted directory holds its source's values: a CRC-32 per param leaf on both sides."""

from __future__ import annotations

import os
import time
import zlib

import numpy as np

from zaya_jax.config import ZayaConfig
from zaya_jax.memory import peak_rss_bytes

from . import layout
from .converted import PARAMS_DIR
from .hf_reader import HFCheckpoint
from .orbax_store import OrbaxReader


def leaf_checksums(read, config: ZayaConfig, sample_layers: int | None = None) -> dict[str, int]:
    """Per param leaf: CRC-32 chained over its layer slices' bytes (param layout, stored dtype).

    ``read(entry, layer)`` returns one slice; ``sample_layers`` checks that many evenly spaced layers."""
    out = {}
    for entry in layout.entries(config):
        crc = 0
        layers = range(entry.first_layer, config.num_hidden_layers) if entry.per_layer else [None]
        if sample_layers and entry.per_layer and len(layers) > sample_layers:
            layers = [layers[round(i * (len(layers) - 1) / (sample_layers - 1))] for i in range(sample_layers)]
        for layer in layers:
            crc = zlib.crc32(np.ascontiguousarray(read(entry, layer)).view(np.uint8), crc)
        out["/".join(entry.path)] = crc
    return out


def verify(src: str, dst: str, sample_layers: int | None = None) -> dict:
    """Checksums of every converted leaf of ``dst`` against the source tensors of ``src`` moved into
    param layout: ``all_equal``, the ``mismatched`` leaves, seconds and peak RSS."""
    config = ZayaConfig.from_pretrained(src)
    ckpt = HFCheckpoint(src, config)
    items = {(item.entry.path, item.layer): item for item in ckpt.items}
    t = time.perf_counter()
    source = leaf_checksums(lambda e, layer: e.to_jax(ckpt.read(items[(e.path, layer)]), config), config, sample_layers)
    reader = OrbaxReader(os.path.join(dst, PARAMS_DIR), config)
    converted = leaf_checksums(reader.read, config, sample_layers)
    mismatched = sorted(k for k in source if source[k] != converted.get(k))
    return {"leaves": len(source), "mismatched": mismatched, "all_equal": not mismatched,
            "layers_checked": "all" if not sample_layers else f"{sample_layers} per leaf",
            "seconds": time.perf_counter() - t, "peak_rss_bytes": peak_rss_bytes()}
