"""zaya-jax: Zyphra's ZAYA1 in JAX/Flax."""

from .cache import KVCache, init_cache
from .checkpoint import load
from .config import ConfigError, ZayaConfig
from .model import apply, cast_params, forward, init, logical_axes
from .validate import InputError

__all__ = [
    "ConfigError",
    "InputError",
    "KVCache",
    "ZayaConfig",
    "apply",
    "cast_params",
    "forward",
    "init",
    "init_cache",
    "load",
    "logical_axes",
]
__version__ = "0.1.0"
