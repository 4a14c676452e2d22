"""Converter benchmark: throughput and peak memory of `zaya convert` / `zaya export` at ZAYA1-8B widths.

Builds a synthetic bf16 checkpoint with the real widths (hidden 2048, 16 experts of 2048, vocab
262272, 8/2 heads of 128, router 256) and a reduced layer count, sharded like the release, then runs
each command in a fresh process (so its peak RSS is its own) several times and reports medians.

    python bench/convert_bench.py [--layers 2] [--repeats 3] [--workdir /tmp/zaya-convert-bench]

Target: peak RSS <= 1.25 x the converted parameter bytes + 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import ml_dtypes

from zaya_jax import synthetic
from zaya_jax.config import ZayaConfig
from zaya_jax.formats import layout

SHARD_BYTES = 1 << 30


def real_width_config(layers: int) -> ZayaConfig:
    return ZayaConfig(num_hidden_layers=layers)  # the defaults are ZAYA1-8B's


def build(path: str, layers: int, seed: int = 0) -> int:
    """Writes the synthetic native checkpoint (``zaya_jax.synthetic``); returns its tensor bytes."""
    return synthetic.write_checkpoint(path, real_width_config(layers), seed=seed, shard_bytes=SHARD_BYTES)["bytes"]


def run_zaya(*args: str) -> dict:
    """Runs `zaya ARGS --json --no-progress` in a fresh process; returns its summary."""
    cmd = [sys.executable, "-m", "zaya_jax.cli", *args, "--json", "--no-progress", "--force"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def bench(layers: int, repeats: int, workdir: str) -> dict:
    src, dst, hf = (os.path.join(workdir, d) for d in ("hf", "converted", "exported"))
    checkpoint_bytes = build(src, layers)
    params = layout.param_bytes(real_width_config(layers), ml_dtypes.bfloat16)
    target = 1.25 * params + 2**30
    result = {"layers": layers, "repeats": repeats, "checkpoint_bytes": checkpoint_bytes, "param_bytes": params,
              "target_peak_rss_bytes": int(target)}
    for verb, args in (("convert", ("convert", src, dst)), ("export", ("export", dst, hf))):
        runs = [run_zaya(*args) for _ in range(repeats)]
        result[verb] = {
            "mb_per_s_median": statistics.median(r["mb_per_s"] for r in runs),
            "seconds_median": statistics.median(r["seconds"] for r in runs),
            "peak_rss_bytes_median": int(statistics.median(r["peak_rss_bytes"] for r in runs)),
            "peak_rss_bytes_max": max(r["peak_rss_bytes"] for r in runs),
        }
    result["convert_meets_target"] = result["convert"]["peak_rss_bytes_max"] <= target
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="blocks (ZAYA1-8B has 40; few keep the disk and time small)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="zaya-convert-bench-")
    try:
        r = bench(args.layers, args.repeats, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    gib = 2**30
    print(json.dumps(r))
    print(f"\nZAYA1-8B widths, {r['layers']} layers, bf16: checkpoint {r['checkpoint_bytes'] / gib:.2f} GiB, "
          f"params {r['param_bytes'] / gib:.2f} GiB; medians of {r['repeats']} runs")
    print("| command | MB/s | seconds | peak RSS (GiB, median / max) | target (GiB) |")
    print("|---|---|---|---|---|")
    for verb in ("convert", "export"):
        v = r[verb]
        target = f"{r['target_peak_rss_bytes'] / gib:.2f}" if verb == "convert" else "-"
        print(f"| zaya {verb} | {v['mb_per_s_median']:.0f} | {v['seconds_median']:.1f} | "
              f"{v['peak_rss_bytes_median'] / gib:.2f} / {v['peak_rss_bytes_max'] / gib:.2f} | {target} |")
    return 0 if r["convert_meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
