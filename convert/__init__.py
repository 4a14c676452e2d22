"""HF safetensors <-> zaya-jax param pytree, streaming (installed as ``zaya_jax.convert``)."""

from .hf_reader import CheckpointError, HFCheckpoint
from .pipeline import Summary, convert, export, is_converted, read_hf, restore, save, save_hf

__all__ = [
    "CheckpointError", "HFCheckpoint", "Summary", "convert", "export", "is_converted", "read_hf", "restore", "save",
    "save_hf",
]
