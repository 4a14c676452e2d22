"""HF safetensors <-> zaya-jax param pytree (installed as ``zaya_jax.convert``)."""

from .hf_reader import CheckpointError, read_native

__all__ = ["CheckpointError", "read_native"]
