"""A converted directory (``zaya convert``, ``zaya_jax.checkpoint.save``): ``params/`` holds the orbax
checkpoint of the stacked param pytree, ``config.json`` (native schema) sits beside it."""

from __future__ import annotations

import json
import os

from zaya_jax import dtypes
from zaya_jax.config import ZayaConfig

from . import orbax_store

PARAMS_DIR = "params"


def is_converted(path: str) -> bool:
    """Whether ``path`` is a directory written by ``zaya convert`` (or ``checkpoint.save``)."""
    return os.path.isfile(os.path.join(path, PARAMS_DIR, "_METADATA"))


def quantization(path: str) -> str | None:
    """The ``quant.SCHEMES`` name a converted directory's weights are quantized with (config.json), or None."""
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f).get(orbax_store.QUANTIZATION_KEY)


def restore(path: str, config: ZayaConfig, dtype=None, shardings: dict | None = None) -> dict:
    """The params of a converted directory as jax arrays (see ``orbax_store.restore``)."""
    return orbax_store.restore(os.path.join(path, PARAMS_DIR), config, dtypes.resolve(dtype), shardings)
