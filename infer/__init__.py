"""Inference: the engine, the sampler, tokenizer and chat, Markov RSA (installed as ``zaya_jax.infer``).

- ``Engine``: continuous batching over a fixed slot pool (``generate``, ``stream``, ``submit`` + ``step``).
- ``generate``: batched generation over token ids (``GenerationResult``: ``.tokens``, ``.stop_reasons``),
  run on an ``Engine`` sized for the call.
- ``decode``: the engine's compiled programs — ``prefill_chunk``, ``insert``, ``decode`` over ``SlotState``.
- ``sampling``: ``SamplingParams`` (per-row arrays), ``filter_logits``, ``sample``.
- ``penalties``: presence / frequency penalties and logit bias (OpenAI's), per-row arrays of the compiled steps.
- ``constraints``: structured output — ``GrammarVocabulary.compile(response_format)`` -> a ``Grammar`` for
  ``Engine.submit(..., grammar=)``; its token masks are computed on the host each step.
- ``rsa``: ``markov_rsa`` (Markov RSA population search on the engine; ``RSAResult`` with every round),
  its settings an ``RSAConfig`` (``rsa_config``: the report's presets as named constructors).
"""

from .decode import SlotState
from .engine import Engine, Request
from .generation import GenerationResult, generate
from .rsa import RSAResult, markov_rsa
from .rsa_config import RSAConfig
from .sampling import SamplingParams, filter_logits, sample

__all__ = [
    "Engine",
    "GenerationResult",
    "RSAConfig",
    "RSAResult",
    "Request",
    "SamplingParams",
    "SlotState",
    "filter_logits",
    "generate",
    "markov_rsa",
    "sample",
]
