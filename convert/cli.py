"""``zaya convert`` and ``zaya export``."""

from __future__ import annotations

import dataclasses
import json

from zaya_jax.cli import DTYPES, QUANTIZATIONS, add_non_finite_arg, bounded_arg


def _quiet_orbax() -> None:
    """Orbax logs routine notices (e.g. skipped OCDBT merges) as absl warnings; keep the CLI output clean."""
    from absl import logging

    logging.set_verbosity(logging.ERROR)


def _report(args, verb: str, summary) -> int:
    if args.json:
        fields = dict(dataclasses.asdict(summary), mb_per_s=summary.mb_per_s)
        print(json.dumps({"command": verb, "src": args.src, "dst": args.dst, **fields}))
    else:
        print(f"{verb} {args.src} -> {args.dst}: {summary}")
    return 0


def _convert_command(args) -> int:
    from .pipeline import convert

    _quiet_orbax()
    summary = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize, force=args.force,
                      progress=not args.no_progress, allow_non_finite=args.allow_non_finite)
    return _report(args, "converted", summary)


def _export_command(args) -> int:
    from .pipeline import export

    _quiet_orbax()
    summary = export(args.src, args.dst, force=args.force, max_shard_bytes=int(args.max_shard_size * 2**30),
                     progress=not args.no_progress, dequantize=args.dequantize)
    return _report(args, "exported", summary)


def _common(p) -> None:
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="HF checkpoint (native or legacy layout) -> converted directory (orbax params + config)",
        description="Streams an HF ZAYA checkpoint tensor by tensor into an orbax checkpoint of the stacked "
                    "params; copies config.json (native schema), tokenizer files and chat template.")
    p.add_argument("src", help="HF checkpoint directory (sharded safetensors + index, or model.safetensors)")
    p.add_argument("dst", help="output directory (written to a temporary directory, renamed at the end)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="stored dtype of the params (default: the checkpoint's; balancing biases stay float32)")
    p.add_argument("--quantize", choices=QUANTIZATIONS, default=None,
                   help="store the expert, attention, router and embedding matrices quantized: int8 (a scale per "
                        "output channel) or int4 (a scale per 128 input rows); the other params in --dtype")
    add_non_finite_arg(p)
    _common(p)
    p.set_defaults(func=_convert_command)

    p = subparsers.add_parser(
        "export", help="converted directory (or HF checkpoint) -> native HF safetensors directory",
        description="Writes the params in the native transformers layout: sharded safetensors, index and "
                    "config.json, loadable with transformers.ZayaForCausalLM.from_pretrained.")
    p.add_argument("src", help="a `zaya convert` directory, or an HF checkpoint (legacy ones become native)")
    p.add_argument("dst", help="output directory")
    p.add_argument("--max-shard-size", type=bounded_arg(0, kind=float, above=True), default=1.0,
                   help="largest shard in GiB (default 1)")
    p.add_argument("--dequantize", action="store_true",
                   help="export a quantized directory's weights dequantized (in its float dtype); without it, "
                        "quantized directories are refused")
    _common(p)
    p.set_defaults(func=_export_command)
