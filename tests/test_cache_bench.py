"""bench/cache_bench.py: the cache-write cost by storage, and why bfloat16 caches hold bits."""

import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import cache_bench  # noqa: E402

from zaya_jax.cache import storage_dtype  # noqa: E402


def test_bfloat16_values_convert_the_whole_cache_and_bits_do_not():
    """The program a bfloat16-valued cache compiles to converts the whole cache (to float32 and back, in
    a layer scan of 4 layers); held as uint16 bits, and as float32 values, it converts none."""
    args = dict(layers=4, batch=2, slots=32, repeats=1)
    _, before = cache_bench.measure(**args, values_dtype=jnp.bfloat16, stored_dtype=np.dtype(jnp.bfloat16))
    _, bits = cache_bench.measure(**args, values_dtype=jnp.bfloat16, stored_dtype=storage_dtype(jnp.bfloat16))
    _, f32 = cache_bench.measure(**args, values_dtype=jnp.float32, stored_dtype=np.dtype(np.float32))
    assert before > 0 and bits == 0 and f32 == 0, (before, bits, f32)
    assert storage_dtype(jnp.float16) == np.uint16 and storage_dtype(jnp.float32) == np.float32
