"""Choices made for XLA:CPU, and the MoE dispatch paths, measured in the compiled TPU programs (ahead of time).

    python bench/tpu_choices.py moe [--topology v5e:2x4] [--mesh expert=8] [--tokens 64,512,4096,16384]
    python bench/tpu_choices.py cpu-choices [--topology v5e:2x4] [--mesh expert=8] [--slots 64] [--max-len 8192]
    python bench/tpu_choices.py decode [--topologies v5e:2x2,v5e:2x4,v6e:2x4,v5p:2x2x2] [--shapes 64x8192,256x2048]
                                       [--impls auto]

``moe``: ZAYA1-8B's prefill (and, at up to 64 tokens, its decode step) with each MoE implementation: the compiler's
FLOPs, bytes accessed and roofline estimate per chip (``zaya_jax.aot``: 4- and 8-layer unrolled compiles,
extrapolated to 40 layers), and the temporaries (the full-size decode program's; the 8-layer prefill's).
``auto`` on TPU picks from this table.

``cpu-choices``: the decode program (64 slots x 8192 by default) as the TPU build makes it, against each
choice made for XLA:CPU turned the other way: the compiler option that disables while-loop-invariant code
motion, the bf16 cache held as uint16 bits, the row-blocked bf16 reads of ``narrow.py``. Reports HBM
(full-size compile) and cost per decode step.

Each measurement runs in a child process: the TPU compiler can crash on a program (a SIGSEGV), and that is
then a row of the table, not the end of the run.

``decode``: the engine's decode step (``moe_impl="auto"``, or each of ``--impls``) at each ``SLOTSxMAX_LEN`` on each topology, on
``zaya plan``'s default serving mesh: whether it fits, total HBM, the estimate per step, tokens/s and bytes
accessed over the minimum (each chip's weight shard read once plus its share of the slot pool). Needs the ``tpu`` extra (libtpu). Estimates, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import subprocess
import sys

IMPLS = ("gather", "grouped", "tiled", "sorted", "dense")


def _one(spec: dict) -> dict:
    import numpy as np

    from zaya_jax import aot, cache, model, narrow
    from zaya_jax import plan as pl
    from zaya_jax import sharding as shd
    from zaya_jax.config import ZayaConfig
    from zaya_jax.mesh import parse_mesh

    config = ZayaConfig()
    topo = aot.topology(spec["topology"])
    chip = aot.chip_of(topo.devices)
    sizes = parse_mesh(spec["mesh"]) if spec["mesh"] else pl.default_mesh("serve", len(topo.devices), config)
    mesh = shd.make_mesh(**sizes, devices=topo.devices)
    stack = contextlib.ExitStack()
    options = model.INFERENCE_COMPILER_OPTIONS
    if spec.get("choice") == "licm":  # XLA's default pass pipeline
        options = {}
    if spec.get("choice") == "bf16-cache":  # the cache holds bfloat16 values, not their bits
        stack.enter_context(_patched(cache, "storage_dtype", lambda dtype: np.dtype(dtype)))
    if spec.get("choice") == "row-blocks":  # the CPU's blocked reads on any platform
        stack.enter_context(_patched(narrow, "use_blocks", lambda w, rows: w.dtype.itemsize < 4 and rows <= narrow.MAX_ROWS))
    with stack:
        if spec["what"] == "decode":
            settings = pl.ServeSettings(slots=spec["slots"], max_len=spec["max_len"], moe_impl=spec["impl"])
            programs, _, pool_bytes_at, _, params = pl.serve_programs(config, mesh, settings, compiler_options=options)
            programs = programs[:1]
        else:
            rows, chunk = spec["rows"], spec["tokens"] // spec["rows"]
            settings = pl.ServeSettings(slots=64, max_len=max(chunk, 16), moe_impl=spec["impl"], prefill_chunk=chunk,
                                        prefill_tokens=spec["tokens"])
            programs = [p for p in pl.serve_programs(config, mesh, settings, all_programs=True, compiler_options=options)[0]
                        if p.name.startswith(f"prefill[rows={rows},bucket={max(chunk, 16)},")]
        report = aot.plan_program(programs[0], config, mesh, chip, capacity=chip.hbm_bytes - pl.RESERVED_BYTES,
                                  full=spec["what"] == "decode")
    out = report.as_json()
    if spec["what"] == "decode":
        out.update(mesh=sizes, waste=pl.decode_waste(report, params, pool_bytes_at(spec["slots"])))
    return out


@contextlib.contextmanager
def _patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def _run(spec: dict) -> dict:
    """``_one(spec)`` in a child process; a crash or time-out is reported as such."""
    try:
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True,
                              timeout=1800)
    except subprocess.TimeoutExpired:
        return {"error": "compile time-out (30 min)"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        crash = "SIGSEGV" if proc.returncode == -11 else f"exit {proc.returncode}"
        tail = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "STACK OVERFLOW" in ln][-1:]
        return {"error": f"TPU compiler crashed ({crash}) {' '.join(tail)[:200]}".strip()}
    return json.loads(lines[-1])


def _fmt(r: dict) -> str:
    if r.get("flops") is None:
        return f"{'':>10} {'':>9} {'':>9} {'':>9}  {r.get('error') or r.get('note')}"
    temps = (r["hbm_bytes"] or {}).get("temporaries")
    return (f"{r['flops'] / 1e12:>10.3f} {r['bytes_accessed'] / 1e9:>9.2f} {r['estimate_seconds'] * 1e3:>9.2f} "
            f"{'-' if temps is None else format(temps / 2**30, '.2f'):>9}  {r.get('error') or ''}")


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(_one(json.loads(sys.argv[2]))), flush=True)
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("moe", "cpu-choices", "decode"))
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--mesh", default="expert=8")
    p.add_argument("--tokens", default="64,512,4096,16384")
    p.add_argument("--impls", default=None, help=f"MoE paths (moe: {','.join(IMPLS)}; decode: auto)")
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--topologies", default="v5e:2x2,v5e:2x4,v6e:2x4,v5p:2x2x2", help="decode: the topologies")
    p.add_argument("--shapes", default="64x8192,256x2048", help="decode: SLOTSxMAX_LEN of each step")
    p.add_argument("--json", default=None, help="also write every row to this file")
    args = p.parse_args()
    impls = (args.impls or (",".join(IMPLS) if args.what == "moe" else "auto")).split(",")
    base = {"topology": args.topology, "mesh": args.mesh}
    rows = []
    where = "zaya plan's serving mesh" if args.what == "decode" else f"{args.topology}, mesh {args.mesh}"
    print(f"ZAYA1-8B bf16 on {where}; per chip; compiler estimates, not runs", flush=True)
    print(f"{'program':<34} {'impl/choice':<12} {'TFLOP':>10} {'GB acc':>9} {'est ms':>9} {'temps GiB':>9}", flush=True)
    if args.what == "moe":
        for tokens in map(int, args.tokens.split(",")):
            for impl in impls:
                if tokens <= 64:
                    spec = {**base, "what": "decode", "impl": impl, "slots": tokens, "max_len": 1024}
                    name = f"decode step, {tokens} slots x 1024"
                else:
                    rows_ = 1 if tokens <= 2048 else 4  # an engine's row buckets are powers of 4
                    spec = {**base, "what": "prefill", "impl": impl, "tokens": tokens, "rows": rows_}
                    name = f"prefill {rows_} x {tokens // rows_}"
                r = _run(spec)
                rows.append({"program": name, "impl": impl, **r})
                print(f"{name:<34} {impl:<12} {_fmt(r)}", flush=True)
    elif args.what == "decode":
        for topology in args.topologies.split(","):
            for shape, impl in itertools.product(args.shapes.split(","), impls):
                slots, max_len = map(int, shape.split("x"))
                spec = {"topology": topology, "mesh": None, "what": "decode", "impl": impl, "slots": slots,
                        "max_len": max_len}
                r = _run(spec)
                rows.append({"topology": topology, "slots": slots, "max_len": max_len, "impl": impl, **r})
                h, fits = r.get("hbm_bytes") or {}, r.get("fits")
                name = f"{topology} decode {slots} x {max_len}"
                extra = "" if r.get("flops") is None else (
                    f"  fits {fits}, total {h.get('total', 0) / 2**30:.2f} GiB, {slots / r['estimate_seconds']:,.0f} "
                    f"tokens/s, bytes / minimum {r['waste']:.2f}x")
                print(f"{name:<34} {impl:<12} {_fmt(r)}{extra}", flush=True)
    else:
        for choice in ("tpu-build", "licm", "bf16-cache", "row-blocks"):
            spec = {**base, "what": "decode", "impl": "auto", "slots": args.slots, "max_len": args.max_len,
                    "choice": choice}
            r = _run(spec)
            rows.append({"choice": choice, **r})
            h = r.get("hbm_bytes") or {}
            name = f"decode {args.slots} x {args.max_len}, total {h.get('total', 0) / 2**30:.2f} GiB"
            print(f"{name:<34} {choice:<12} {_fmt(r)}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
