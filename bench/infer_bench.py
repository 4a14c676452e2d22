"""Inference benchmark: transformers' ZAYA (PyTorch CPU, eager) vs zaya-jax, same config, same weights,
same prompts, measured side by side in one run.

    python bench/infer_bench.py [--repeats 5] [--config bench-124M]

Rows: prefill of one 512-token prompt (tokens/s; the two alternate call by call, and each pair's ratio
is printed too), greedy decode at batch 1 and batch 16 (aggregate new tokens/s over 63 steps after a
128-token prompt), and zaya-jax compile times (first call minus the median run). Figures are medians
over ``--repeats`` runs after a warm-up; ratios are jax / HF. Last, the floor of a decode step at batch
1 and 16 on this machine (``decode_floor``) and the fraction of it zaya-jax reaches (floor time /
measured step time).

transformers' decode is timed with a bare loop of cached forward calls (``logits_to_keep=1``, argmax),
which is cheaper than its ``generate`` loop, so the ratios are conservative. zaya-jax runs its
``generate`` programs: the compiled prefill (which also picks the first token) and the compiled
``lax.while_loop`` decode.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import zaya_jax
from zaya_jax.bench_configs import CONFIGS
from zaya_jax.infer import decode
from zaya_jax.infer.engine import request_keys
from zaya_jax.infer.sampling import SamplingParams

PREFILL_LEN = 512
DECODE_PROMPT, DECODE_NEW = 128, 64  # 64 new tokens: 1 from the prefill, 63 decode steps


def wall(fn) -> float:
    """Wall seconds of one ``fn()`` call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed(fn, repeats: int):
    """(first call seconds, median of ``repeats`` further calls, last result)."""
    t = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t)
    return first, statistics.median(runs), out


# ------------------------------------------------------------------------------------------ transformers
def hf_prefill(model, ids):
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    return out


def hf_greedy(model, ids, steps):
    """Prefill, then ``steps`` cached one-token forwards; returns (decode seconds, new tokens [B, steps+1])."""
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        new = [token]
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=out.cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            new.append(token)
        seconds = time.perf_counter() - t
    return seconds, torch.cat(new, dim=1).numpy()


# ------------------------------------------------------------------------------------------ zaya-jax
def jax_start(params, config, ids: np.ndarray, new: int):
    """The engine's compiled prefill and insert of equal-length prompts ``ids [B, S]`` into a B-slot pool
    (the first token sampled): (slot pool, first tokens [B])."""
    B, S = ids.shape
    dtype = zaya_jax.model.compute_dtype(params)
    last, cache = decode.prefill_chunk_compiled(
        params, config, zaya_jax.init_cache(config, B, S, dtype), jnp.asarray(ids, jnp.int32),
        jnp.full((B,), S, jnp.int32), jnp.zeros((B, config.vocab_size)), moe_impl="auto")
    T = -(-(S + new) // 16) * 16
    rows = jnp.arange(B, dtype=jnp.int32)
    state, first, *_ = decode.insert_compiled(
        decode.init_slots(zaya_jax.init_cache(config, B, T, dtype), 4), cache, last, rows, rows, jnp.int32(B),
        jax.random.wrap_key_data(request_keys(0, np.arange(B))), SamplingParams.create(B),
        jnp.full((B,), new, jnp.int32), jnp.full((B,), T, jnp.int32), jnp.full((B, 4), -1, jnp.int32))
    return jax.block_until_ready((state, first))


def jax_decode(params, config, start, steps: int):
    """``steps`` compiled decode steps of the pool; every token so far ``[B, 1 + steps]``."""
    state, first = start
    state, out, _ = decode.decode_compiled(params, config, state, jnp.zeros(first.shape, bool), steps=steps,
                                        moe_impl="auto")
    return jnp.concatenate([first[:, None], jax.block_until_ready(out)], axis=1)


def machine_rates(repeats: int) -> tuple[float, float]:
    """(float32 matmul FLOP/s, memory bandwidth bytes/s) of this machine, as XLA:CPU reaches them.

    FLOP/s from a 1024^3 matmul (cache-friendly, compute-bound); read bandwidth from summing 256 MB (far
    beyond any cache; a decode step mostly reads weights).
    """
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    _, mm_seconds, _ = timed(lambda: jax.block_until_ready(matmul(a)), max(repeats, 10))
    big = jnp.ones((64 * 1024 * 1024,), jnp.float32)
    read = jax.jit(jnp.sum)
    _, bw_seconds, _ = timed(lambda: jax.block_until_ready(read(big)), max(repeats, 10))
    return 2 * n**3 / mm_seconds, big.nbytes / bw_seconds


def decode_floor(params, config, state, rates: tuple[float, float]) -> dict:
    """A lower bound on the time of the next decode step of ``state``, for any implementation here.

    The step multiplies each row by the LM head, every non-expert weight and its expert in every layer
    (2 FLOPs per weight per row), and reads each of those weights at least once: the head, the
    non-expert weights and every expert some row routes to (counted by running that very step). Bound:
    max(FLOPs / matmul FLOP/s, bytes / read bandwidth), with ``rates`` = (FLOP/s, bytes/s) measured here
    (``machine_rates``); attention over the cache and everything else only add to it.
    """
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    nparams = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    layers = dict(params["layers"])
    experts = layers.pop("experts")
    head = zaya_jax.model.head_kernel(params, config)
    E, batch = config.num_experts, state.token.shape[0]
    ctx = zaya_jax.model.cached_context(state.cache, 1)
    _, _, aux = zaya_jax.model.apply(params, config, state.token[:, None], ctx, state.cache)
    touched = int((aux["route_counts"][:, :E] > 0).sum())  # (layer, expert) pairs this step reads
    flop = 2 * batch * (nparams(head) + nparams(layers) + nparams(experts) // E)
    must_read = nbytes(head) + nbytes(layers) + touched * (nbytes(experts) // (E * config.num_hidden_layers))
    flops, bandwidth = rates
    return {"flops": flops, "bandwidth": bandwidth, "flop": flop, "bytes": must_read,
            "experts_per_layer": touched / config.num_hidden_layers,
            "seconds": max(flop / flops, must_read / bandwidth)}


def run(name: str, repeats: int) -> None:
    torch.manual_seed(0)
    hf_config = transformers.ZayaConfig(**CONFIGS[name])
    hf_config._attn_implementation = "eager"
    model = transformers.ZayaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        config, params = zaya_jax.load(path)
    rng = np.random.default_rng(0)
    rows = []

    # Prefill 1 x 512, the two alternating call by call: the machine's speed drifts by up to 1.5x within a
    # minute here, and timing one side's runs after the other's put that drift into the ratio (0.7x-1.4x).
    ids = rng.integers(1, config.vocab_size, (1, PREFILL_LEN))
    hf_prefill(model, torch.as_tensor(ids))  # warm-up
    first = wall(lambda: jax_start(params, config, ids, 1))
    hf_runs, jx_runs = [], []
    for _ in range(repeats):
        hf_runs.append(wall(lambda: hf_prefill(model, torch.as_tensor(ids))))
        jx_runs.append(wall(lambda: jax_start(params, config, ids, 1)))
    hf_t, jx_t = statistics.median(hf_runs), statistics.median(jx_runs)
    rows.append(("prefill 1x512 (tokens/s)", PREFILL_LEN / hf_t, PREFILL_LEN / jx_t))
    prefill_ratios = sorted(h / j for h, j in zip(hf_runs, jx_runs))
    compiles = [("prefill 1x512", first - jx_t)]

    # Greedy decode, batch 1 and 16, each against its floor.
    rates, floors = machine_rates(repeats), {}
    for batch in (1, 16):
        ids = rng.integers(1, config.vocab_size, (batch, DECODE_PROMPT))
        steps = DECODE_NEW - 1
        hf_runs = [hf_greedy(model, torch.as_tensor(ids), steps) for _ in range(repeats)]
        hf_t = statistics.median(r[0] for r in hf_runs)
        jax_start(params, config, ids, DECODE_NEW)  # compile the prefill for this shape
        t = time.perf_counter()
        out = jax_decode(params, config, jax_start(params, config, ids, DECODE_NEW), steps)
        first = time.perf_counter() - t
        runs = []
        for _ in range(repeats):
            start = jax_start(params, config, ids, DECODE_NEW)
            t = time.perf_counter()
            out = jax_decode(params, config, start, steps)
            runs.append(time.perf_counter() - t)
        jx_t = statistics.median(runs)
        compiles.append((f"decode loop, batch {batch}", first - jx_t))
        floors[batch] = (decode_floor(params, config, jax_start(params, config, ids, DECODE_NEW)[0], rates), jx_t / steps)
        assert (np.asarray(out) >= 0).all(), "the decode loop stopped early"
        agree = (np.asarray(out) == hf_runs[0][1]).mean()
        rows.append((f"decode batch {batch} (new tokens/s)", batch * steps / hf_t, batch * steps / jx_t, agree))

    print(f"\n{name}: float32, {jax.device_count()} jax device(s), torch threads {torch.get_num_threads()}, "
          f"median of {repeats}")
    print("| measurement | transformers | zaya-jax | ratio | greedy tokens equal |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        agree = f"{row[3]:.0%}" if len(row) > 3 else "-"
        print(f"| {row[0]} | {row[1]:,.0f} | {row[2]:,.0f} | {row[2] / row[1]:.1f}x | {agree} |")
    print(f"\nPrefill ratio in each of the {repeats} alternating pairs: "
          + ", ".join(f"{r:.2f}x" for r in prefill_ratios))
    print("\n| zaya-jax compile (first call minus median run) | seconds |")
    print("| --- | ---: |")
    for what, seconds in compiles:
        print(f"| {what} | {seconds:.1f} |")
    flops, bandwidth = rates
    print(f"\nDecode floors: this machine reaches {flops / 1e9:.0f} GFLOP/s (float32 matmul) and {bandwidth / 1e9:.1f} "
          "GB/s (read); a step must do the FLOPs of every weight its rows use and read each of those weights once.")
    print("| decode | GFLOP per step | MB read per step | experts per layer | floor ms/step | zaya-jax ms/step "
          "| fraction of floor |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for batch, (floor, step) in floors.items():
        print(f"| batch {batch} | {floor['flop'] / 1e9:.2f} | {floor['bytes'] / 1e6:.0f} | {floor['experts_per_layer']:.1f} "
              f"| {1e3 * floor['seconds']:.1f} | {1e3 * step:.1f} | **{floor['seconds'] / step:.0%}** |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-124M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    run(args.config, args.repeats)


if __name__ == "__main__":
    main()
