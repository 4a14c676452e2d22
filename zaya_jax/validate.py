"""Checks of model inputs at the public entry points, outside jit: inside it, an out-of-vocabulary id is
silently clamped by the embedding gather and an empty axis fails deep in XLA, so refuse first and name
the value."""

from __future__ import annotations

import math

import jax
import numpy as np

from .config import ZayaConfig


def is_integer(value) -> bool:
    """A Python or numpy integer, not a bool (``True`` would pass as 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_finite_number(value) -> bool:
    """A finite Python or numpy int or float, not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value))


class InputError(ValueError):
    """Model inputs (token ids, attention mask, lengths) the model cannot run on; the message names the value."""


def _unreadable(value) -> bool:
    """A tracer (a caller's jit), or a global array spanning other processes: shape and dtype are all this
    process can check without a collective (which a refusal in one process alone would leave hanging)."""
    return isinstance(value, jax.core.Tracer) or (isinstance(value, jax.Array) and not value.is_fully_addressable)


def _integer_array(value, name: str):
    """``value`` as an integer numpy array, or kept as it is when :func:`_unreadable`."""
    if not _unreadable(value):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError) as e:  # ragged nested lists
            raise InputError(f"{name} must be a rectangular array of integers: {e}") from None
    if value.dtype == np.bool_ or not np.issubdtype(value.dtype, np.integer):
        raise InputError(f"{name} must hold integers, got dtype {value.dtype}")
    return value


def validate_ids(input_ids, config: ZayaConfig, attention_mask=None):
    """``(input_ids, attention_mask)`` checked for ``config``: ``[batch, seq]`` integers, both axes non-empty,
    ``seq <= config.max_position_embeddings``, ids in ``[0, vocab_size)``, the mask (None is kept) of the
    same shape and of 1/0, with no 0 between real tokens. Raises :class:`InputError` naming the first bad value.

    Inputs come back as numpy integer arrays, except tracers (a caller's jit) and arrays spanning other
    processes, which are checked for shape and dtype only and kept."""
    ids = _integer_array(input_ids, "input_ids")
    if ids.ndim != 2:
        raise InputError(f"input_ids must be [batch, seq], got shape {tuple(ids.shape)}")
    if 0 in ids.shape:
        raise InputError(f"input_ids must hold at least one token per row, got shape {tuple(ids.shape)}")
    if ids.shape[1] > config.max_position_embeddings:
        raise InputError(f"input_ids has {ids.shape[1]} tokens per row, more than the model's "
                         f"max_position_embeddings={config.max_position_embeddings}")
    check_range(ids, "input_ids", 0, config.vocab_size, f"outside the vocabulary [0, {config.vocab_size})")
    if attention_mask is None:
        return ids, None
    mask = _integer_array(attention_mask, "attention_mask")
    if tuple(mask.shape) != tuple(ids.shape):
        raise InputError(f"attention_mask shape {tuple(mask.shape)} != input_ids shape {tuple(ids.shape)}")
    check_range(mask, "attention_mask", 0, 2, "is not 0 or 1")
    if not _unreadable(mask):  # a 0 between real tokens would give logits of neither sequence
        real = mask.astype(bool)
        seen = np.logical_or.accumulate(real, axis=1) & np.logical_or.accumulate(real[:, ::-1], axis=1)[:, ::-1]
        hole = np.argwhere(seen & ~real)
        if hole.size:
            raise InputError(f"attention_mask{[int(i) for i in hole[0]]} = 0 lies between real tokens of its row; "
                             "padding goes before them (left) or after them (right)")
    return ids, mask


def check_range(array, name: str, low: int, high: int, problem: str) -> None:
    """Refuses the first value of ``array`` outside ``[low, high)``, by index; tracers are not checked."""
    if _unreadable(array):
        return
    bad = np.argwhere((array < low) | (array >= high))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise InputError(f"{name}{list(where)} = {int(array[where])} {problem}"
                         + (f" ({len(bad)} values in all)" if len(bad) > 1 else ""))
