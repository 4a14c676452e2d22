"""HF safetensors <-> zaya-jax param pytree, streaming (installed as ``zaya_jax.convert``)."""

from zaya_jax.formats.converted import is_converted, restore
from zaya_jax.formats.hf_reader import CheckpointError, HFCheckpoint
from zaya_jax.formats.tree import read_hf

from .pipeline import Summary, convert, export, save, save_hf

__all__ = [
    "CheckpointError", "HFCheckpoint", "Summary", "convert", "export", "is_converted", "read_hf", "restore", "save",
    "save_hf",
]
