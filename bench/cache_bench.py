"""What a decode step's KV-cache writes cost, by how the cache is stored (XLA:CPU).

    python bench/cache_bench.py [--layers 40] [--batch 1 4] [--slots 1024] [--repeats 7]

A layer scan at ZAYA1-8B's cache shapes (2 KV heads of 128) carries the whole ``[layers, batch, slots,
heads, head_dim]`` K cache, writes one token per row into its layer (``.at[...].set(mode="drop")``, as
``zaya_jax.model`` does) and reads that layer back; nothing else. Storages: float32 values, bfloat16
values (what the cache held before: XLA:CPU computes a narrow-float update in float32, converting the
whole cache there and back at every layer), and bfloat16 held as uint16 bit patterns
(``zaya_jax.cache.storage_dtype``: integer updates stay in place). Prints milliseconds per decode step
(median) and the dtype conversions of the whole cache in the compiled program.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.cache import from_bits, storage_dtype, to_bits
from zaya_jax.model import INFERENCE_COMPILER_OPTIONS

HEADS, HEAD_DIM = 2, 128


def step_program(layers: int, batch: int, slots: int, values_dtype, stored_dtype):
    """One decode step's cache traffic: ``layers`` writes of a token per row, each layer read back."""

    def layer(carry, index):
        h, cache = carry
        k = jnp.broadcast_to((h[:, :HEAD_DIM] * (index + 1))[:, None, None, :], (batch, 1, HEADS, HEAD_DIM))
        slot = (5 + 3 * jnp.arange(batch))[:, None]
        value = k.astype(values_dtype)
        if stored_dtype != np.dtype(values_dtype):
            value = to_bits(k, values_dtype)
        cache = cache.at[index, jnp.arange(batch)[:, None], slot].set(value, mode="drop")
        mine = from_bits(cache[index], values_dtype).astype(jnp.float32)  # [batch, slots, heads, head_dim]
        # Consumed by a dot, as attention consumes it (a reduction here would fuse with the write).
        scores = jnp.einsum("bthd,bd->bth", mine, h[:, :HEAD_DIM])
        return (h + 1e-3 * scores.sum(axis=(1, 2))[:, None], cache), None

    def step(h, cache):
        (h, cache), _ = jax.lax.scan(layer, (h, cache), jnp.arange(layers))
        return h, cache

    return jax.jit(step, donate_argnums=1, compiler_options=INFERENCE_COMPILER_OPTIONS)


def measure(layers, batch, slots, values_dtype, stored_dtype, repeats):
    program = step_program(layers, batch, slots, values_dtype, stored_dtype)
    h = jnp.ones((batch, 2 * HEAD_DIM), jnp.float32)
    cache = jnp.zeros((layers, batch, slots, HEADS, HEAD_DIM), stored_dtype)
    text = program.lower(h, cache).compile().as_text()
    shape = ",".join(map(str, (layers, batch, slots, HEADS, HEAD_DIM)))
    whole_converts = len(re.findall(rf"= \w+\[{shape}\]\{{[^}}]*\}} convert\(", text))
    h, cache = jax.block_until_ready(program(h, cache))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        h, cache = jax.block_until_ready(program(h, cache))
        times.append(time.perf_counter() - t)
    return statistics.median(times), whole_converts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--slots", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    storages = {
        "float32 values": (jnp.float32, np.dtype(np.float32)),
        "bfloat16 values (before)": (jnp.bfloat16, np.dtype(jnp.bfloat16)),
        "bfloat16 as uint16 bits (now)": (jnp.bfloat16, storage_dtype(jnp.bfloat16)),
    }
    print(f"K-cache writes of one decode step: {args.layers} layers, {args.slots} slots, {HEADS} heads of {HEAD_DIM}")
    print("| batch | storage | ms per step | whole-cache conversions in the program |")
    print("| ---: | --- | ---: | ---: |")
    for batch in args.batch:
        for name, (values, stored) in storages.items():
            seconds, whole = measure(args.layers, batch, args.slots, values, stored, args.repeats)
            print(f"| {batch} | {name} | {1e3 * seconds:.1f} | {whole} |", flush=True)


if __name__ == "__main__":
    main()
