"""MoE dispatch benchmark: every ``zaya_jax.moe`` implementation on the same routed tokens.

    python bench/moe_bench.py [--config bench-124M|tiny] [--tokens 1,4,16,64,512,2048] [--impls loop,tiled,sorted]
                               [--repeats 20] [--grad]

Runs the MoE of all ``--layers`` layers the way the model does, inside one ``lax.scan`` over the
layer stack (``--config``'s widths, bench-124M by default: D = F = 512, E = 16, 8 layers; float32, top-1 routing
uniform over the experts plus the skip route). Implementations that take the whole stack (``loop``,
``sorted``) slice each expert at (layer, expert); the others get the scan's per-layer slice. Prints the
median milliseconds per call of each implementation for each token count; ``auto`` picks from these.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from zaya_jax import moe
from zaya_jax.bench_configs import CONFIGS


def layer_stack_moe(impl: str, grad: bool = False):
    """A jitted ``(x [T, D], idx [L, T], gate [L, T], gate_up [L, E, D, 2F], down [L, E, F, D]) -> [T, D]``.

    With ``grad``: the gradients of ``sum(out ** 2)`` with respect to ``x``, ``gate_up`` and ``down``.
    """

    def run(x, idx, gate, gate_up, down):
        skip = jnp.zeros_like(gate[0])

        def layer(h, xs):
            if impl in moe.STACK_IMPLS:
                i, layer_idx, layer_gate = xs
                y = moe.experts(h, layer_idx, layer_gate, skip, gate_up, down, impl, layer=i)
            else:
                layer_idx, layer_gate, gu, dn = xs
                y = moe.experts(h, layer_idx, layer_gate, skip, gu, dn, impl)
            return h + y, None

        n = idx.shape[0]
        xs = (jnp.arange(n), idx, gate) if impl in moe.STACK_IMPLS else (idx, gate, gate_up, down)
        return jax.lax.scan(layer, x, xs)[0]

    if grad:
        return jax.jit(jax.grad(lambda x, idx, gate, gu, dn: jnp.sum(run(x, idx, gate, gu, dn) ** 2), argnums=(0, 3, 4)))
    return jax.jit(run)


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t)
    return 1e3 * statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="1,4,16,32,64,512,2048")
    parser.add_argument("--impls", default="gather,loop,tiled,sorted")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-124M", help="widths and layer count")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--grad", action="store_true", help="time the backward pass too (training)")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    c = CONFIGS[args.config]
    L, E, D, F = c["num_hidden_layers"], c["num_experts"], c["hidden_size"], c["moe_intermediate_size"]
    k = jax.random.split(jax.random.key(0), 4)
    gate_up = 0.02 * jax.random.normal(k[0], (L, E, D, 2 * F))
    down = 0.02 * jax.random.normal(k[1], (L, E, F, D))
    impls = args.impls.split(",")
    what = "forward + backward" if args.grad else "forward"
    print(f"MoE {what} over {L} layers, D={D} F={F} E={E}, float32, median ms of {args.repeats}")
    print("| tokens | " + " | ".join(impls) + " |")
    print("| ---: |" + " ---: |" * len(impls))
    for tokens in map(int, args.tokens.split(",")):
        x = jax.random.normal(jax.random.fold_in(k[2], tokens), (tokens, D))
        idx = jax.random.randint(jax.random.fold_in(k[3], tokens), (L, tokens), 0, E + 1)
        gate = jnp.full((L, tokens), 0.5)
        times = [median_ms(layer_stack_moe(impl, args.grad), (x, idx, gate, gate_up, down), args.repeats) for impl in impls]
        print(f"| {tokens} | " + " | ".join(f"{t:.2f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
