"""A converted directory (``zaya convert``, ``zaya_jax.checkpoint.save``): ``params/`` holds the orbax
checkpoint of the stacked param pytree, ``config.json`` (native schema) sits beside it."""

from __future__ import annotations

import json
import os

from zaya_jax import dtypes, quant
from zaya_jax.config import ZayaConfig

from . import orbax_store

PARAMS_DIR = "params"


def is_converted(path: str) -> bool:
    """Whether ``path`` is a directory written by ``zaya convert`` (or ``checkpoint.save``)."""
    return os.path.isfile(os.path.join(path, PARAMS_DIR, "_METADATA"))


def quantization(path: str) -> quant.Scheme | None:
    """The scheme a converted directory's weights are quantized with (config.json records it), or None."""
    with open(os.path.join(path, "config.json")) as f:
        return orbax_store.config_scheme(json.load(f))


def restore(path: str, config: ZayaConfig, dtype=None, shardings: dict | None = None) -> dict:
    """The params of a converted directory as jax arrays (see ``orbax_store.restore``)."""
    return orbax_store.restore(os.path.join(path, PARAMS_DIR), config, dtypes.resolve(dtype), shardings)
