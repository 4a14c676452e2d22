"""What the LM head costs per decode call on XLA:CPU, by how its weight is read.

    python bench/head_bench.py [--vocab 262272] [--hidden 2048] [--rows 1 4 16 64] [--repeats 5]

Logits of ``rows`` final hidden states (bfloat16) against ZAYA1-8B's tied embedding ``[vocab, hidden]``,
bfloat16 or int8 (per-row scales), compiled as the inference programs are (``INFERENCE_COMPILER_OPTIONS``):

- ``whole``:  one dot against the whole weight (``model.whole_head_logits``: XLA:CPU converts it to float32 first);
- ``blocks``: ``narrow.blocked_logits``, the weight read in blocks of 1,024 vocabulary entries, each
  converted in cache (what ``model.head_logits`` runs on CPU for a quantized head; a bf16 head keeps
  ``whole``).

Prints the median milliseconds per call of ``--repeats`` timings of 5 calls each.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax import narrow, quant
from zaya_jax.model import INFERENCE_COMPILER_OPTIONS, whole_head_logits


def whole(h, head):
    return whole_head_logits(h, head, True)


def blocks(h, head):
    return narrow.blocked_logits(h, head, True)


def ms_per_call(fn, h, head, repeats: int, calls: int = 5) -> float:
    fn(h, head).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            out = fn(h, head)
        out.block_until_ready()
        times.append((time.perf_counter() - t) / calls)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=262272)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    bf16 = jnp.asarray(rng.standard_normal((args.vocab, args.hidden), dtype=np.float32) * 0.02, jnp.bfloat16)
    heads = {"bf16": bf16, "int8": quant.quantize(bf16, 1, quant.scheme("int8"))}
    programs = {name: jax.jit(fn, compiler_options=INFERENCE_COMPILER_OPTIONS) for name, fn in
                (("whole", whole), ("blocks", blocks))}
    print(f"LM head [{args.vocab}, {args.hidden}], ms per call (median of {args.repeats})")
    print("| rows | bf16 whole | bf16 blocks | int8 whole | int8 blocks |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        # [rows, 1, hidden]: a decode step's final hidden states, as the model passes them
        h = jnp.asarray(rng.standard_normal((rows, 1, args.hidden), dtype=np.float32), jnp.bfloat16)
        cells = [ms_per_call(programs[form], h, heads[kind], args.repeats)
                 for kind in ("bf16", "int8") for form in ("whole", "blocks")]
        print(f"| {rows} | " + " | ".join(f"{c:.1f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
