"""``zaya plan``: compile a model's serve / train / rl programs for a TPU topology on this host, and report."""

from __future__ import annotations

import dataclasses
import json
import sys

from .cli import QUANTIZATIONS, bounded_arg

RELEASED = "zaya1-8b"  # the released model's shapes: ZayaConfig()'s defaults


def register(subparsers) -> None:
    from .moe import MOE_IMPLS
    from .plan import ServeSettings, TrainSettings

    serve, train = ServeSettings(), TrainSettings()
    p = subparsers.add_parser(
        "plan", help="compile the serve / train / rl programs for a TPU topology ahead of time: HBM, cost, fit",
        description="Compiles, with the TPU compiler (libtpu) on this host, the programs a task would run on a "
                    "TPU topology, and reports per chip: HBM (arguments, outputs, temporaries) against the chip's "
                    "capacity, FLOPs, bytes accessed, a roofline time estimate and the collectives. Only the "
                    "config is read, never weights. Exit 0 when the plan ran, fitting or not.")
    p.add_argument("model", help=f"a model directory or its config.json, or {RELEASED!r} for the released shapes")
    p.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:2x4, v5e:1x1, v5p:2x2x2, v6e:2x2")
    p.add_argument("--mesh", default=None, help="mesh sizes, e.g. expert=8 or data=2,expert=4 (default: serve "
                                                 "splits experts, train/rl shard weights over fsdp)")
    p.add_argument("--task", choices=("serve", "train", "rl"), default="serve")
    p.add_argument("--all-programs", action="store_true",
                   help="serve: compile every prefill and insert program the engine would build (default: the "
                        "decode program and the prefill programs that bound the others)")
    p.add_argument("--memory-only", action="store_true",
                   help="compile each program at full size only: HBM and fit, without the cost compiles (faster)")
    p.add_argument("--in-process", action="store_true",
                   help="compile in this process, not one child per program: starts faster and shows a failing "
                        "compile's traceback, but a crash of the TPU compiler ends the plan")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    s = p.add_argument_group("serve (and rl's rollout engine)")
    s.add_argument("--slots", type=bounded_arg(1), default=serve.slots, help="default %(default)s")
    s.add_argument("--max-len", type=bounded_arg(2), default=serve.max_len, help="default %(default)s")
    s.add_argument("--decode-steps", type=bounded_arg(1), default=serve.decode_steps, help="default %(default)s")
    s.add_argument("--prefill-chunk", type=bounded_arg(1), default=serve.prefill_chunk,
                   help="prompt tokens per prefill call and row, default %(default)s")
    s.add_argument("--prefill-tokens", type=bounded_arg(1), default=serve.prefill_tokens,
                   help="tokens (rows x chunk) per prefill call at most, default %(default)s")
    p.add_argument("--moe-impl", choices=MOE_IMPLS, default=serve.moe_impl,
                   help="the MoE dispatch (zaya_jax.moe), default %(default)s")
    t = p.add_argument_group("train and rl")
    t.add_argument("--batch-size", type=bounded_arg(1), default=train.batch_size, help="default %(default)s")
    t.add_argument("--seq-len", type=bounded_arg(2), default=train.seq_len,
                   help="tokens per row (rl: also the rollout engine's max-len), default %(default)s")
    t.add_argument("--remat", choices=("none", "full", "dots"), default=train.remat, help="default %(default)s")
    t.add_argument("--grad-accum", type=bounded_arg(1), default=train.grad_accum, help="default %(default)s")
    p.add_argument("--compute-dtype", choices=("bfloat16", "float32"), default=train.compute_dtype,
                   help="the dtype the forward runs in (serve: the served float weights'), default %(default)s")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="serve: weights stored quantized, as `zaya convert --quantize` writes them (default: float)")
    p.set_defaults(func=_plan_command)


def load_config(model: str):
    from .config import ZayaConfig

    return ZayaConfig() if model == RELEASED else ZayaConfig.from_pretrained(model)


def _plan_command(args) -> int:
    from . import plan as planner
    from .mesh import parse_mesh

    planner.aot.require_libtpu()
    config = load_config(args.model)
    if args.quantize and args.task != "serve":
        raise SystemExit(f"--quantize plans serving only; {args.task} needs float weights")
    serve = planner.ServeSettings(slots=args.slots, max_len=args.max_len, decode_steps=args.decode_steps,
                                  dtype=args.compute_dtype, quantize=args.quantize, moe_impl=args.moe_impl, prefill_chunk=args.prefill_chunk,
                                  prefill_tokens=args.prefill_tokens)
    train = planner.TrainSettings(batch_size=args.batch_size, seq_len=args.seq_len, remat=args.remat,
                                  grad_accum=args.grad_accum, compute_dtype=args.compute_dtype, moe_impl=args.moe_impl)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731  (stdout: the plan alone)
    result = planner.plan(config, args.topology, task=args.task, mesh_sizes=parse_mesh(args.mesh) if args.mesh else None,
                          serve=serve, train=train, all_programs=args.all_programs, cost=not args.memory_only,
                          isolate=not args.in_process, progress=progress)
    result["settings"] = {"model": args.model, **(dataclasses.asdict(serve) if args.task == "serve" else {}),
                          **(dataclasses.asdict(train) if args.task != "serve" else {})}
    print(json.dumps(result, indent=1) if args.json else render(result))
    return 0


def _gib(n) -> str:
    return "-" if n is None else f"{n / (1 << 30):.2f}"


def render(result: dict) -> str:
    """The plan as text: one row per program, then the task's summary."""
    chip = result["chip"]
    mesh = ",".join(f"{a}={n}" for a, n in result["mesh"].items() if n > 1) or "one chip"
    lines = [f"{result['task']} on {result['topology']}: {result['chips']} x {chip['name']} "
             f"({_gib(result['capacity_bytes'])} GiB usable HBM per chip), mesh {mesh}",
             "per chip; times are roofline estimates from the compiler's FLOPs and bytes, not runs", "",
             f"{'program':<44} {'fits':>4} {'args':>7} {'outs':>7} {'temps':>7} {'total':>7} {'+resid':>7} "
             f"{'GFLOP':>10} {'GB acc':>8} {'est ms':>8} {'compile':>7}  collectives"]
    for p in result["programs"]:
        h = p["hbm_bytes"] or {}
        coll = ", ".join(f"{k} x{v['count']:.0f} ({v['bytes'] / 1e6:.1f} MB)" for k, v in (p["collectives"] or {}).items())
        num = lambda v, scale, fmt: "-" if v is None else format(v * scale, fmt)  # noqa: E731
        lines.append(
            f"{p['name']:<44} {'yes' if p['fits'] else 'NO':>4} {_gib(h.get('arguments')):>7} {_gib(h.get('outputs')):>7} "
            f"{_gib(h.get('temporaries')):>7} {_gib(h.get('total')):>7} {_gib(p['resident_bytes']):>7} "
            f"{num(p['flops'], 1e-9, '.1f'):>10} {num(p['bytes_accessed'], 1e-9, '.2f'):>8} "
            f"{num(p['estimate_seconds'], 1e3, '.2f'):>8} {p['compile_seconds']:>6.0f}s  {coll or '-'}")
        for text in filter(None, (p["error"], p["note"])):
            lines.append(f"{'':<4}{text}")
    lines.append("")
    lines.append(f"fits: {'yes' if result['fits'] else 'NO'}")
    if "max_slots" in result:
        check = result["max_slots_check"]
        lines.append(f"max_slots at max_len {result['settings']['max_len']}: {result['max_slots']}"
                     + (" (checked by a compile at that size)" if check.get("checked") else f" ({check.get('reason')})"))
    if "decode" in result:
        d = result["decode"]
        lines.append(f"decode at {d['slots']} slots: {d['step_seconds_estimate'] * 1e3:.2f} ms/step estimated, "
                     f"{d['tokens_per_second_estimate']:,.0f} tokens/s; bytes accessed / minimum "
                     f"{d['bytes_over_minimum']:.2f}x")
    if "train" in result:
        t = result["train"]
        lines.append(f"train step: {t['step_seconds_estimate']:.2f} s estimated, MFU {100 * t['mfu_estimate']:.0f}% "
                     f"({t['tokens_per_step']:,} tokens)")
    return "\n".join(lines)
