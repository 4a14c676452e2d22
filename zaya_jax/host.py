"""Host buffers that become jax arrays without a copy, so a model is held once in memory.

On the CPU backend ``jax.device_put`` of a numpy array whose data is aligned (XLA wants 64 bytes)
hands the buffer itself to XLA; an unaligned array is copied, and ``jnp.asarray`` always copies. Numpy
aligns large allocations to 16 bytes only, so loaders allocate with :func:`empty`, fill the buffer in
place (layer slice by layer slice), then call :func:`to_device`: peak host memory is the weights once
plus one slice, instead of twice the weights. On an accelerator ``to_device`` is an ordinary transfer.
The way back, :func:`to_host`, gathers an array that spans processes.
"""

from __future__ import annotations

import jax
import numpy as np

ALIGNMENT = 64  # bytes; XLA:CPU's minimum alignment for aliasing a host buffer


def empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``ALIGNMENT``-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def full(shape, fill, dtype) -> np.ndarray:
    out = empty(shape, dtype)
    out.fill(fill)
    return out


def is_aligned(array: np.ndarray) -> bool:
    return array.flags.c_contiguous and array.ctypes.data % ALIGNMENT == 0


def to_device(array: np.ndarray) -> jax.Array:
    """``array`` as a jax array on the default device; on CPU it aliases an aligned ``array`` (no copy).

    The caller must not write to ``array`` afterwards.
    """
    out = jax.device_put(array)
    out.block_until_ready()
    return out


def to_host(array) -> np.ndarray:
    """A jax array as numpy on every process, gathering the other processes' shards when it spans them."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
