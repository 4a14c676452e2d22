"""Inference: sampler, decode loop, tokenizer and chat, Markov RSA (installed as ``zaya_jax.infer``).

- ``generate``: batched generation over token ids (``GenerationResult``: ``.tokens``, ``.stop_reasons``).
- ``engine``: the reusable pure pieces — ``prefill``, ``decode_step``, ``start``, ``decode`` (the
  ``lax.while_loop``), ``DecodeState``.
- ``sampling``: ``SamplingParams`` (per-row arrays), ``filter_logits``, ``sample``.
- ``rsa``: ``markov_rsa`` (Markov RSA population search; ``RSAResult`` with every round).
"""

from .engine import DecodeState, decode, decode_step, prefill, start
from .generation import GenerationResult, generate
from .rsa import RSAResult, markov_rsa
from .sampling import SamplingParams, filter_logits, sample

__all__ = [
    "DecodeState",
    "GenerationResult",
    "RSAResult",
    "SamplingParams",
    "decode",
    "decode_step",
    "filter_logits",
    "generate",
    "markov_rsa",
    "prefill",
    "sample",
    "start",
]
