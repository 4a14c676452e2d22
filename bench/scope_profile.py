"""Where a compiled program's time goes, by the model's named scopes (an XLA:CPU profile, summarised).

    python bench/scope_profile.py [--batch 16] [--steps 16] [--repeats 5] [--config bench-124M]

Profiles the engine's compiled decode (``decode_compiled``, ``--steps`` steps per call, a pool of
``--batch`` running slots after a 128-token prompt) with ``jax.profiler`` and prints milliseconds per
decode step for each named scope of ``zaya_jax.model`` (attention, cca_projection, router, experts,
lm_head; "other" is everything outside them: norms, residual merges, sampling, the cache moving through
the layer scan). How: every op the XLA:CPU runtime executes is a trace event naming its HLO instruction;
the optimized HLO gives each instruction's ``op_name``, which carries the JAX named scopes. Control-flow
instructions (while, conditional, call) are left out so that time is not counted twice.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

SCOPES = ("cca_projection", "attention", "router", "experts", "lm_head")  # innermost first
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(")  # name = <shape or tuple> opcode(
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CONTROL = {"while", "conditional", "call"}


def instruction_scopes(hlo_text: str) -> dict[str, str | None]:
    """Instruction name -> its named scope (None for control flow, which only wraps other ops)."""
    return {name: scope for name, (scope, _) in instructions(hlo_text).items()}


def instructions(hlo_text: str) -> dict[str, tuple[str | None, str]]:
    """Instruction name -> (named scope or None for control flow, its op_name)."""
    found = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, opcode = m.groups()
        op_name = _OP_NAME.search(line)
        op_name = op_name.group(1) if op_name else ""
        path = op_name.split("/")
        found[name] = (None if opcode in _CONTROL else next((s for s in SCOPES if s in path), "other"), op_name)
    return found


def op_seconds(trace_dir: str, module: str) -> dict[str, float]:
    """Summed durations (seconds) per HLO instruction over the trace's events of HLO module ``module``."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    if not files:
        raise RuntimeError(f"no perfetto trace was written under {trace_dir}")
    with gzip.open(max(files, key=os.path.getmtime)) as f:
        trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    totals: collections.Counter = collections.Counter()
    for e in events:
        args = e.get("args") or {}
        if e.get("ph") == "X" and args.get("hlo_module") == module:
            totals[args.get("hlo_op")] += e["dur"] * 1e-6  # microseconds
    return dict(totals)


def profile(call, hlo_text: str, calls: int) -> dict[str, float]:
    """Seconds per call of ``call()`` by HLO instruction (control flow left out), over ``calls`` profiled
    calls; ``hlo_text``: the optimized HLO of the program ``call`` runs (``jax.stages.Compiled.as_text()``)."""
    module = re.search(r"HloModule (\S+?),", hlo_text).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(call())
        totals = op_seconds(tmp, module)
    scopes = instruction_scopes(hlo_text)
    return {op: seconds / calls for op, seconds in totals.items() if scopes.get(op, "other") is not None}


def by_scope(op_times: dict[str, float], hlo_text: str) -> dict[str, float]:
    """Per-instruction times summed per named scope."""
    scopes, totals = instruction_scopes(hlo_text), collections.Counter()
    for op, seconds in op_times.items():
        totals[scopes.get(op, "other")] += seconds
    return dict(totals)


def main() -> None:
    from infer_bench import DECODE_PROMPT, jax_start

    import zaya_jax
    from zaya_jax.bench_configs import CONFIGS
    from zaya_jax.infer import decode

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-124M")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=0, help="also list the N slowest instructions")
    args = parser.parse_args()

    config = zaya_jax.ZayaConfig(**CONFIGS[args.config])
    params = zaya_jax.init(config, jax.random.key(0))
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (args.batch, DECODE_PROMPT))
    # Room for every profiled step: the rows never stop, so each call runs all its steps.
    new = (args.repeats + 2) * args.steps + 1
    state, _ = jax_start(params, config, ids, new)
    cancel = jnp.zeros((args.batch,), bool)
    step = decode.decode_compiled.lower(params, config, state, cancel, steps=args.steps, moe_impl="auto").compile()
    run = lambda s: step(params, s, cancel)  # noqa: E731  (static args are baked into the compiled program)
    state, *_ = run(state)  # warm
    t = time.perf_counter()
    state, *_ = jax.block_until_ready(run(state))
    wall = (time.perf_counter() - t) / args.steps
    pool = [state]  # donated: each profiled call consumes the previous call's state

    def call():
        pool[0], out, _ = run(pool[0])
        return out

    op_times = {op: seconds / args.steps for op, seconds in profile(call, step.as_text(), args.repeats).items()}
    per_step = by_scope(op_times, step.as_text())
    total = sum(per_step.values())
    print(f"{args.config} float32, decode batch {args.batch}, {args.steps} steps per call, "
          f"{args.repeats} profiled calls; wall {1e3 * wall:.1f} ms/step (unprofiled), ops {1e3 * total:.1f} ms/step")
    print("| scope | ms per step | share |")
    print("| --- | ---: | ---: |")
    for scope in (*SCOPES, "other"):
        seconds = per_step.get(scope, 0.0)
        print(f"| {scope} | {1e3 * seconds:.2f} | {seconds / total:.0%} |")
    if args.top:
        ops = instructions(step.as_text())
        print("\n| instruction | ms per step | op_name |")
        print("| --- | ---: | --- |")
        for op, seconds in sorted(op_times.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"| {op} | {1e3 * seconds:.2f} | {ops.get(op, (None, '?'))[1][-90:]} |")


if __name__ == "__main__":
    main()
