"""Dtype names, and which param leaves stay float32 whatever the model's dtype.

One map from the names used on the command line, in config.json and in ``dtype=`` arguments to
numpy dtypes (``ml_dtypes.bfloat16`` is jax's bfloat16, so the results serve jax too), and one rule
for the leaves that are never cast: the router's balancing biases, because top-1 selection must not
be perturbed by bfloat16 rounding.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

NAMES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_ALIASES = {"bf16": "bfloat16", "fp32": "float32", "f32": "float32", "fp16": "float16"}
# The router's balancing biases: state, not trained by the optimizer (``zaya_jax.train.balance``).
BALANCING_BIASES = ("layers", "router", "balancing_biases")
# Param paths (as in ``zaya_jax.init``'s tree) held in float32 whatever the model's dtype.
FLOAT32_LEAVES = frozenset({BALANCING_BIASES})


def resolve(dtype) -> np.dtype | None:
    """``None``, a numpy/jax dtype or a name (``"bfloat16"``, ``"bf16"``, ...) -> numpy dtype or None.

    Raises ValueError for a dtype outside ``NAMES``."""
    if dtype is None:
        return None
    name = getattr(dtype, "name", None) or getattr(dtype, "__name__", None) or str(dtype)
    name = _ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unsupported dtype {dtype!r}; choose one of {sorted(NAMES)}")
    return np.dtype(NAMES[name])


def stays_float32(path) -> bool:
    """Whether the param leaf at ``path`` stays float32: a tuple of keys, or a jax key path."""
    return tuple(getattr(k, "key", k) for k in path) in FLOAT32_LEAVES


def leaf_dtype(path, dtype) -> np.dtype:
    """The dtype of the leaf at ``path`` when the model is held in ``dtype``."""
    return np.dtype(np.float32) if stays_float32(path) else np.dtype(dtype)
