"""Sampling filters and token choice with per-row parameters (pure functions over arrays).

Every knob is a per-row array, so rows (and RSA population members) differ without recompiling. The
filters follow transformers' order and definitions: temperature, then top-k, then top-p, then min-p,
each acting on what the previous one kept. Each filter keeps a prefix of the descending-sorted
logits, so the result is one cut-off value per row; tokens tied with the cut-off are all kept (an
exact tie is the only case where transformers, which drops by sort position, may keep fewer).

Shapes: B rows, V vocabulary.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.validate import is_integer

Array = jax.Array
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1  # seeds are signed 64-bit integers


@flax.struct.dataclass
class SamplingParams:
    """Per-row sampling knobs.

    temperature: [B] float32  0 means greedy (argmax of the raw logits)
    top_k:       [B] int32    0 disables
    top_p:       [B] float32  1 disables
    min_p:       [B] float32  0 disables
    """

    temperature: Array
    top_k: Array
    top_p: Array
    min_p: Array

    @classmethod
    def create(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> "SamplingParams":
        """Validated params for ``batch`` rows; each knob is a scalar or one value per row."""
        knobs = check_knobs(batch, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        return cls(**{k: jnp.asarray(v) for k, v in knobs.items()})


def check_knobs(batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0) -> dict[str, np.ndarray]:
    """The sampling knobs as validated ``[batch]`` numpy arrays (a scalar or one value per row each);
    raises ValueError naming the knob and its bad values."""
    temperature = per_row("temperature", temperature, batch, np.float32)
    top_k = per_row("top_k", top_k, batch, np.int32)
    top_p = per_row("top_p", top_p, batch, np.float32)
    min_p = per_row("min_p", min_p, batch, np.float32)
    if (temperature < 0).any() or not np.isfinite(temperature).all():
        raise ValueError(f"temperature must be finite and >= 0, got {temperature.tolist()}")
    if (top_k < 0).any():
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k.tolist()}")
    if ((top_p <= 0) | (top_p > 1)).any() or not np.isfinite(top_p).all():
        raise ValueError(f"top_p must be in (0, 1], got {top_p.tolist()}")
    if ((min_p < 0) | (min_p > 1)).any() or not np.isfinite(min_p).all():
        raise ValueError(f"min_p must be in [0, 1], got {min_p.tolist()}")
    return dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def per_row(name: str, value, batch: int, dtype) -> np.ndarray:
    """A scalar or one value per row as a validated ``[batch]`` numpy array of ``dtype``."""
    arr = np.asarray(value)
    if np.issubdtype(dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.integer):  # ints past 64 bits come as dtype object
            raise ValueError(f"{name} must be integers of at most 64 bits, got {arr.tolist()}")
        limits = np.iinfo(dtype)
        if arr.size and (arr.min() < limits.min or arr.max() > limits.max):  # a cast would wrap silently
            raise ValueError(f"{name} must be in [{limits.min}, {limits.max}], got {arr.tolist()}")
    if arr.ndim == 0:
        return np.full((batch,), arr, dtype)
    if arr.shape != (batch,):
        raise ValueError(f"{name} must be a scalar or have one value per prompt ({batch}), got shape {arr.shape}")
    return arr.astype(dtype)


def filter_logits(logits: Array, params: SamplingParams) -> Array:
    """Temperature-scaled logits with the tokens that top-k, top-p and min-p remove set to -inf.

    logits: [B, V] -> [B, V] float32. Rows with temperature 0 are filtered at temperature 1.
    """
    B, V = logits.shape
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    x = logits.astype(jnp.float32) / temperature[:, None]
    ranked = -jnp.sort(-x, axis=-1)  # [B, V] descending
    first = jnp.arange(V) == 0  # every filter keeps at least the best token

    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, V), V)
    kth = jnp.take_along_axis(ranked, (k - 1)[:, None], axis=-1)
    keep = ranked >= kth

    probs = _masked_softmax(ranked, keep)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= (mass_before < params.top_p[:, None]) | (params.top_p[:, None] >= 1.0) | first

    probs = _masked_softmax(ranked, keep)
    keep &= (probs >= params.min_p[:, None] * probs[:, :1]) | first

    cutoff = jnp.min(jnp.where(keep, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(x >= cutoff, x, -jnp.inf)


def _masked_softmax(x: Array, keep: Array) -> Array:
    return jax.nn.softmax(jnp.where(keep, x, -jnp.inf), axis=-1)


def token_logprobs(logits: Array, temperature: Array, tokens: Array) -> Array:
    """``log softmax(logits / temperature)[tokens]`` [B] float32 (temperature 0 counts as 1): the
    log-probability of each row's token under the temperature-scaled distribution, filters aside.

    logits: [B, V]; temperature: [B]; tokens: [B] int32.
    """
    t = jnp.where(temperature > 0, temperature, 1.0)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / t[:, None], axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


def step_keys(keys: Array, step) -> Array:
    """Per-row keys ``[B]`` for generation step ``step`` (a scalar, or ``[B]``: each row's own step).
    A row's draws depend on its key and step alone, not on the batch."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(step, keys.shape))


def seed_key(seed: int) -> Array:
    """The typed key of ``seed``, a signed 64-bit integer: threefry key data (high 32 bits, low 32 bits),
    as ``jax.random.key(seed)`` gives it with 64-bit integers enabled. Every seed has a stream of its own;
    seeds in [0, 2**32) keep the key ``jax.random.key`` gives them by default (which drops the high bits).
    ValueError for a non-integer (``True`` included) or a seed out of range."""
    if not is_integer(seed) or not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}], got {seed!r}")
    seed = int(seed)
    return jax.random.wrap_key_data(np.array([(seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF], np.uint32))


def row_keys(seed: int, batch: int) -> Array:
    """Typed keys ``[batch]``: row ``b`` gets ``fold_in(seed_key(seed), b)``."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key(seed), jnp.arange(batch))


def sample(logits: Array, params: SamplingParams, keys: Array) -> Array:
    """Next tokens ``[B]`` int32 from ``logits [B, V]``: greedy where temperature is 0, else a draw
    from the filtered distribution with that row's key (``keys [B]``, e.g. from ``step_keys``).

    The sort behind the filters is skipped when every row is greedy.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = params.temperature > 0

    def draw():
        filtered = filter_logits(logits, params)
        return jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(hot), draw, lambda: greedy)
    return jnp.where(hot, drawn, greedy)



def mask_tokens(logits: Array, bitmask: Array) -> Array:
    """``logits`` [B, V] with the tokens ``bitmask`` [B, ceil(V / 32)] int32 disallows set to -inf: token ``v``
    is allowed when bit ``v % 32`` of word ``v // 32`` is set (the layout grammar libraries fill; -1 words
    allow all)."""
    V = logits.shape[-1]
    v = jnp.arange(V)
    allowed = (jnp.right_shift(bitmask[:, v // 32], v % 32) & 1).astype(bool)
    return jnp.where(allowed, logits, -jnp.inf)
