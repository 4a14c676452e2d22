"""Full-size ZAYA1-8B on one host: a synthetic checkpoint with the exact release shapes, converted,
loaded and run in bfloat16, with each step's peak memory measured in its own process.

    # everything, in order, on a fresh work directory (about 45 GB of disk at 40 layers):
    python bench/full_size.py all --workdir work/zaya-full
    # or one step at a time:
    python bench/full_size.py write DIR [--layers 40] [--legacy] [--seed 0]
    python bench/full_size.py all --workdir DIR --steps write,convert,verify,load,run,hf,compare

Steps of ``all``, run in the order bandwidth, write, convert, run, hf, compare, verify, load, generate
(each measured step is a fresh process, so its peak RSS — ``VmHWM`` — is its own; a failed step is
recorded in results.json and the others still run):

- ``write``    synthetic native checkpoint of ``--layers`` (40) and ``--small-layers`` (4) blocks:
               release names and shapes, bfloat16, sharded safetensors + index + config.json, written
               one tensor at a time (``--legacy``: the 80-layer legacy layout instead).
- ``convert``  ``zaya convert`` on both: peak RSS (target <= 4 GiB and within 10% between the two),
               MB/s.
- ``verify``   every converted leaf against the source: a checksum (CRC-32 of each layer slice's bytes
               in param layout) per leaf on both sides, compared.
- ``load``     ``zaya_jax.load`` of the converted and of the HF directory in bfloat16: seconds, peak RSS
               (target <= weight bytes + 3 GiB).
- ``run``      one process: load the converted model, prefill logits of 64 tokens (saved for
               ``compare``), then greedy generation of 64 tokens from a 16-token prompt, timed:
               seconds per decode token (median of repeats, after a compile run).
- ``generate`` the ``zaya generate`` command itself (16 tokens, bf16): peak RSS and wall time.
- ``hf``       transformers' ``ZayaForCausalLM.from_pretrained(..., dtype=torch.bfloat16)`` on the same
               checkpoint, same 64 tokens, in its own process: logits saved.
- ``compare``  top-1 agreement over the 64 positions (target >= 99%), plus stricter figures.
- ``quantize`` ``zaya convert --quantize int8`` (``--quantize``) of the HF checkpoint: peak RSS, MB/s.
- ``quantized_run`` the ``run`` step on the HF checkpoint in bf16, then on the quantized one: decode
               s/token of each and their ratio, and the quantized prefill logits against bf16's.
- ``quantized_generate`` the ``generate`` step on the quantized checkpoint: peak RSS.
- ``bandwidth`` host memory read bandwidth (median of repeats; the faster of a numpy and an XLA
               reduction) -> the decode floor: bytes read per token / bandwidth.

Synthetic weights: ``zaya_jax.synthetic`` (weight-like values, deterministic per tensor name and ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from zaya_jax.memory import peak_rss_bytes

HERE = os.path.abspath(__file__)
GIB = 2**30
PROMPT_LEN, NEW_TOKENS, LOGIT_TOKENS = 16, 16, 64
# Tokens of the timed generations in ``run``: enough that the decode (~0.2 s/token at full size) outweighs
# the run-to-run spread of the prefill they are measured against (about a second).
TIMED_TOKENS = 64
CONVERT_RSS_TARGET = 4 * GIB
LOAD_RSS_SLACK = 3 * GIB
DECODE_FLOOR_TARGET = 2.0  # decode seconds per token over the bandwidth floor


# ---------------------------------------------------------------------------------------------- memory
def start_watchdog(limit_bytes: int) -> None:
    """Ends this process (exit 3) as soon as its resident set exceeds ``limit_bytes``: a guard for
    shared machines, so a measurement that goes wrong cannot push other processes out of memory."""
    import threading

    def watch():
        while True:
            with open("/proc/self/status") as f:
                rss = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            if rss > limit_bytes:
                print(f"full_size.py: RSS {rss / GIB:.2f} GiB exceeds --rss-limit {limit_bytes / GIB:.2f} GiB; stopping",
                      file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()


def child(step: str, *args: str, env: dict | None = None) -> dict:
    """Runs ``full_size.py _STEP ARGS`` in a fresh process; returns the JSON of its last stdout line."""
    cmd = [sys.executable, HERE, f"_{step}", *args]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"step {step} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out.setdefault("wall_seconds", wall)
    return out


# ------------------------------------------------------------------------------------------- checkpoint
def full_config(layers: int):
    from zaya_jax.config import ZayaConfig

    return ZayaConfig(num_hidden_layers=layers)  # the defaults are ZAYA1-8B's (reference §1.1)


def write_checkpoint(path: str, layers: int = 40, seed: int = 0, legacy: bool = False) -> dict:
    """The synthetic ZAYA1-8B checkpoint of ``layers`` blocks at ``path`` (see ``zaya_jax.synthetic``)."""
    from zaya_jax import synthetic

    return synthetic.write_checkpoint(path, full_config(layers), seed=seed, legacy_layout=legacy)


# ------------------------------------------------------------------------------------------- the model
def weight_bytes(config, dtype=ml_dtypes.bfloat16) -> int:
    from zaya_jax.formats import layout

    return layout.param_bytes(config, dtype)


def bytes_per_token(config, dtype=ml_dtypes.bfloat16) -> dict:
    """Weight bytes one batch-1 decode step reads: every non-expert leaf (the embedding once, as the
    tied LM head reads all of it), one expert per layer (top-1; an upper bound, the skip route reads
    none). The KV cache of a few dozen tokens (40 KiB per token) is left out."""
    from zaya_jax.formats import layout

    experts = other = 0
    for entry, shape, d in layout.leaves(config, dtype):
        n = int(np.prod(shape)) * d.itemsize
        if entry.path[:2] == ("layers", "experts"):
            experts += n // config.num_experts
        else:
            other += n
    return {"non_expert": other, "touched_experts": experts, "total": other + experts}


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    rng = np.random.default_rng(seed)
    return [2] + rng.integers(3, vocab, n - 1).tolist()  # <bos> then random ids


def _load(args) -> dict:
    import jax.numpy as jnp

    import zaya_jax

    t = time.perf_counter()
    config, params = zaya_jax.load(args.model, dtype=jnp.bfloat16)
    seconds = time.perf_counter() - t
    nbytes = sum(x.nbytes for x in __import__("jax").tree_util.tree_leaves(params))
    return {"model": args.model, "seconds": seconds, "param_bytes": nbytes, "peak_rss_bytes": peak_rss_bytes(),
            "gb_per_s": nbytes / 1e9 / seconds}


def _run(args) -> dict:
    """Load, prefill logits of LOGIT_TOKENS tokens, then timed greedy generation."""
    import jax

    from zaya_jax.cli import resolve_model
    from zaya_jax.infer import generate
    from zaya_jax.model import forward

    t = time.perf_counter()
    config, params, _ = resolve_model(args.model, "bfloat16")  # what `zaya generate --compute-dtype bfloat16` runs
    out = {"load_seconds": time.perf_counter() - t, "load_peak_rss_bytes": peak_rss_bytes(),
           "param_bytes": sum(x.nbytes for x in jax.tree_util.tree_leaves(params)),
           "huge_page_bytes": anon_huge_page_bytes()}

    ids = prompt_ids(LOGIT_TOKENS, config.vocab_size)
    t = time.perf_counter()
    logits = np.asarray(forward(params, config, np.array([ids]))[0])
    out["prefill_logits_seconds_with_compile"] = time.perf_counter() - t
    np.save(args.logits, logits)
    del logits

    prompt = [ids[:PROMPT_LEN]]
    greedy = dict(max_new_tokens=TIMED_TOKENS, temperature=0.0, stop_token_ids=[])
    t = time.perf_counter()
    first = generate(params, config, prompt, **greedy)
    out["generate_first_call_seconds"] = time.perf_counter() - t  # compiles prefill and the decode loop
    one, full = [], []
    for _ in range(args.repeats):  # pairs: each decode time is a generation less the prefill run just before it
        t = time.perf_counter()
        generate(params, config, prompt, **dict(greedy, max_new_tokens=1))  # prefill + first token only
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        result = generate(params, config, prompt, **greedy)
        full.append(time.perf_counter() - t)
        assert result.tokens == first.tokens
    out.update(
        tokens=first.tokens[0], stop_reason=first.stop_reasons[0], repeats=args.repeats,
        prefill_seconds_median=statistics.median(one), generate_seconds_median=statistics.median(full),
        decode_seconds_per_token=statistics.median(f - o for f, o in zip(full, one)) / (TIMED_TOKENS - 1),
        peak_rss_bytes=peak_rss_bytes(),
    )
    return out


def _hf(args) -> dict:
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    model = transformers.ZayaForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16)
    model.eval()
    load_seconds = time.perf_counter() - t
    biases = {b.detach().float().numpy().round(6).tobytes() for n, b in model.named_buffers() if n.endswith("balancing_biases")}
    ids = torch.tensor([prompt_ids(LOGIT_TOKENS, model.config.vocab_size)])
    t = time.perf_counter()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float().numpy()
    np.save(args.logits, logits)
    return {"load_seconds": load_seconds, "forward_seconds": time.perf_counter() - t, "peak_rss_bytes": peak_rss_bytes(),
            "balancing_biases_after_load": [np.frombuffer(b, np.float32).tolist() for b in biases]}


def compare(jax_logits: np.ndarray, hf_logits: np.ndarray, ids: list[int]) -> dict:
    """Top-1 agreement and stricter figures between two [S, V] logit arrays."""
    a, b = jax_logits.astype(np.float64), hf_logits.astype(np.float64)
    top_a, top_b = a.argmax(-1), b.argmax(-1)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    la, lb = log_softmax(a), log_softmax(b)
    pa = np.exp(la)
    rows = np.arange(len(ids))
    a2, b2 = a.copy(), b.copy()  # the best token other than the position's own input token
    a2[rows, ids], b2[rows, ids] = -np.inf, -np.inf
    return {
        "positions": len(ids),
        "top1_agreement": float((top_a == top_b).mean()),
        "top1_is_input_token": float((top_b == np.asarray(ids)).mean()),
        "top1_excluding_input_token_agreement": float((a2.argmax(-1) == b2.argmax(-1)).mean()),
        "top5_overlap": float(np.mean([len(set(np.argsort(-x)[:5]) & set(np.argsort(-y)[:5])) / 5 for x, y in zip(a, b)])),
        "max_abs_logit_diff": float(np.abs(a - b).max()),
        "mean_abs_logit_diff": float(np.abs(a - b).mean()),
        "logit_std": float(b.std()),
        "max_abs_logit": float(np.abs(b).max()),
        "mean_kl_jax_vs_hf": float((pa * (la - lb)).sum(-1).mean()),
    }


def _bandwidth(args) -> dict:
    """Host memory read bandwidth: medians over repeats of a 1 GiB reduction, one pass, reads only.

    Two readers: numpy (one thread) and an XLA:CPU ``jnp.sum`` (its thread pool; up to 1.4x numpy here).
    The floor takes the faster (``read_gb_per_s``): the stricter floor, and what XLA itself reaches.
    """
    import jax
    import jax.numpy as jnp

    a = np.ones(GIB // 8, np.uint64)
    b = np.empty_like(a)
    x = jnp.ones((GIB // 4,), jnp.float32)
    xla_sum = jax.jit(jnp.sum)
    jax.block_until_ready(xla_sum(x))  # compile
    reads, xla_reads, copies = [], [], []
    for _ in range(args.repeats):
        t = time.perf_counter()
        np.add.reduce(a)
        reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(xla_sum(x))
        xla_reads.append(time.perf_counter() - t)
        t = time.perf_counter()
        np.copyto(b, a)
        copies.append(time.perf_counter() - t)
    numpy_read, xla_read = (GIB / 1e9 / statistics.median(r) for r in (reads, xla_reads))
    return {"read_gb_per_s": max(numpy_read, xla_read), "numpy_read_gb_per_s": numpy_read,
            "xla_read_gb_per_s": xla_read, "copy_read_plus_write_gb_per_s": 2 * GIB / 1e9 / statistics.median(copies),
            "repeats": args.repeats}


def anon_huge_page_bytes() -> int:
    """Anonymous memory of this process on transparent huge pages (0 where the kernel does not say).

    Decode reads every weight once per token; on 4 KiB pages the TLB misses of those reads cost about a
    fifth of the step (docs/benchmarks.md), so the run records how much of the weights got huge pages.
    """
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("AnonHugePages:")), 0)
    except OSError:
        return 0


def _cli(args) -> dict:
    """Runs the ``zaya`` command line in this process, then reports its peak RSS."""
    from zaya_jax.cli import main

    t = time.perf_counter()
    rc = main(args.argv)
    return {"rc": rc, "seconds": time.perf_counter() - t, "peak_rss_bytes": peak_rss_bytes()}


# ------------------------------------------------------------------------------------------------- all
BIG_STEPS = ("run", "hf", "load", "generate", "quantized_run", "quantized_generate")  # hold the whole model in memory
STEPS = ("bandwidth", "write", "convert", "run", "hf", "compare", "verify", "load", "generate",
         "quantize", "quantized_run", "quantized_generate")


def run_all(args) -> dict:
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    results_path = os.path.join(work, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    steps = args.steps.split(",") if args.steps else STEPS
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown step(s) {sorted(unknown)}; choose from {STEPS}")
    sizes = sorted({args.small_layers, args.layers})
    hf = {n: os.path.join(work, f"hf-{n}") for n in sizes}
    conv = {n: os.path.join(work, f"converted-{n}") for n in sizes}
    big = args.layers
    jax_logits, hf_logits = os.path.join(work, "jax_logits.npy"), os.path.join(work, "hf_logits.npy")
    quantized = os.path.join(work, f"{args.quantize}-{big}")

    def record(key, value):
        results[key] = value
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        print(f"[{time.strftime('%H:%M:%S')}] {key}: {json.dumps(value)}", flush=True)

    def reuse(n, step, path):
        """With --reuse-small: keep the small model's checkpoint and figures from an earlier run."""
        return args.reuse_small and n != big and f"{step}_{n}" in results and os.path.isdir(path)

    def run_step(step):
        if step == "bandwidth":
            record("bandwidth", child("bandwidth", "--repeats", "5"))
        elif step == "write":
            for n in sizes:
                if reuse(n, "write", hf[n]):
                    continue
                if os.path.exists(hf[n]):
                    shutil.rmtree(hf[n])
                record(f"write_{n}", child("write", hf[n], "--layers", str(n), "--seed", str(args.seed),
                                           *(["--legacy"] if args.legacy else [])))
        elif step == "convert":
            for n in sizes:
                if reuse(n, "convert", conv[n]):
                    continue
                out = child("cli", "convert", hf[n], conv[n], "--dtype", "bfloat16", "--json", "--no-progress", "--force")
                with open(os.path.join(conv[n], "zaya_convert.json")) as f:
                    out["summary"] = json.load(f)
                out["summary"]["mb_per_s"] = out["summary"]["bytes"] / 1e6 / out["summary"]["seconds"]
                record(f"convert_{n}", out)
        elif step == "verify":
            record(f"verify_{big}", child("verify", hf[big], conv[big], *(
                ["--sample-layers", str(args.verify_sample_layers)] if args.verify_sample_layers else [])))
        elif step == "load":
            record(f"load_converted_{big}", child("load", conv[big]))
            record(f"load_hf_{big}", child("load", hf[big]))
        elif step == "run":
            record(f"run_{big}", child("run", conv[big], "--logits", jax_logits, "--repeats", str(args.repeats)))
        elif step == "generate":
            ids = ",".join(map(str, prompt_ids(PROMPT_LEN, full_config(big).vocab_size)))
            record(f"zaya_generate_{big}", child("cli", "generate", conv[big], "--compute-dtype", "bfloat16", "--prompt-ids", ids,
                                                 "--max-new-tokens", str(NEW_TOKENS), "--json"))
        elif step == "hf":
            record(f"hf_{big}", child("hf", hf[big], "--logits", hf_logits))
        elif step == "compare":
            ids = prompt_ids(LOGIT_TOKENS, full_config(big).vocab_size)
            record(f"compare_{big}", compare(np.load(jax_logits), np.load(hf_logits), ids))
        elif step == "quantize":
            record(f"convert_{args.quantize}_{big}", child("cli", "convert", hf[big], quantized, "--quantize", args.quantize,
                                                           "--json", "--no-progress", "--force"))
        elif step == "quantized_run":  # bf16 (from the HF directory) and quantized, one after the other
            logits = {kind: os.path.join(work, f"{kind}_logits.npy") for kind in ("bfloat16", args.quantize)}
            bf16 = child("run", hf[big], "--logits", logits["bfloat16"], "--repeats", str(args.repeats))
            record(f"run_bf16_hf_{big}", bf16)
            q = child("run", quantized, "--logits", logits[args.quantize], "--repeats", str(args.repeats))
            q["decode_over_bf16"] = q["decode_seconds_per_token"] / bf16["decode_seconds_per_token"]
            record(f"run_{args.quantize}_{big}", q)
            ids = prompt_ids(LOGIT_TOKENS, full_config(big).vocab_size)
            record(f"compare_{args.quantize}_vs_bf16_{big}",
                   compare(np.load(logits[args.quantize]), np.load(logits["bfloat16"]), ids))
        elif step == "quantized_generate":
            ids = ",".join(map(str, prompt_ids(PROMPT_LEN, full_config(big).vocab_size)))
            record(f"zaya_generate_{args.quantize}_{big}", child("cli", "generate", quantized, "--compute-dtype", "bfloat16",
                                                                 "--prompt-ids", ids, "--max-new-tokens", str(NEW_TOKENS), "--json"))


    def available() -> int:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))

    for step in steps:
        if step in BIG_STEPS and args.min_available_gib and available() < args.min_available_gib * GIB:
            record(f"error_{step}", f"skipped: {available() / GIB:.1f} GiB available, --min-available-gib "
                                    f"{args.min_available_gib} needed")
            continue
        try:
            run_step(step)
        except (RuntimeError, OSError, ValueError) as e:  # record it and go on with the other steps
            record(f"error_{step}", str(e)[-3000:])
    results["commit"] = _commit()
    results["targets"] = targets(results, big, args.small_layers)
    with open(results_path, "w") as f:
        json.dump(results, f, indent=1)
    print(report(results, big, args.small_layers))
    return results


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(HERE), capture_output=True, text=True)
        return out.stdout.strip() or None
    except OSError:
        return None


def targets(r: dict, big: int, small: int) -> dict:
    config = full_config(big)
    out = {"weight_bytes": weight_bytes(config), "bytes_per_token": bytes_per_token(config)}
    cb, cs = r.get(f"convert_{big}"), r.get(f"convert_{small}")
    if cb:
        out["convert_peak_rss_ok"] = cb["peak_rss_bytes"] <= CONVERT_RSS_TARGET
    if cb and cs:
        out["convert_rss_ratio_big_over_small"] = cb["peak_rss_bytes"] / cs["peak_rss_bytes"]
        out["convert_rss_within_10pct"] = abs(out["convert_rss_ratio_big_over_small"] - 1) <= 0.10
    if f"verify_{big}" in r:
        out["verify_ok"] = r[f"verify_{big}"]["all_equal"]
    for key in (f"load_converted_{big}", f"load_hf_{big}"):
        if key in r:
            out[f"{key}_rss_ok"] = r[key]["peak_rss_bytes"] <= out["weight_bytes"] + LOAD_RSS_SLACK
    if "bandwidth" in r:
        out["decode_floor_seconds_per_token"] = out["bytes_per_token"]["total"] / (r["bandwidth"]["read_gb_per_s"] * 1e9)
        if f"run_{big}" in r:
            out["decode_floor_ratio"] = r[f"run_{big}"]["decode_seconds_per_token"] / out["decode_floor_seconds_per_token"]
            out["decode_within_2x_floor_ok"] = out["decode_floor_ratio"] <= DECODE_FLOOR_TARGET
    if f"compare_{big}" in r:
        out["top1_ok"] = r[f"compare_{big}"]["top1_agreement"] >= 0.99
    return out


def report(r: dict, big: int, small: int) -> str:
    """The results as a markdown table (as in docs/benchmarks.md, with the targets)."""
    t = r.get("targets", {})
    gib = lambda n: f"{n / GIB:.2f} GiB"  # noqa: E731
    yes = lambda ok: "yes" if ok else "**no**"  # noqa: E731
    rows = []
    for n in (small, big):
        c = r.get(f"convert_{n}")
        if c:
            s = c["summary"]
            rows.append((f"`zaya convert`, {n} layers ({gib(s['bytes'])})",
                         f"{s['seconds']:.0f} s, {s['mb_per_s']:.0f} MB/s; peak RSS {gib(c['peak_rss_bytes'])}",
                         "<= 4 GiB", yes(c["peak_rss_bytes"] <= CONVERT_RSS_TARGET)))
    if "convert_rss_ratio_big_over_small" in t:
        ratio = t["convert_rss_ratio_big_over_small"]
        rows.append((f"convert peak RSS, {big} vs {small} layers", f"ratio {ratio:.3f}", "within 10%",
                     yes(t["convert_rss_within_10pct"])))
    v = r.get(f"verify_{big}")
    if v:
        rows.append((f"converted == source ({v['leaves']} leaves, CRC-32 per leaf, {v['layers_checked']} layers)",
                     "all equal" if v["all_equal"] else f"mismatched: {v['mismatched']}", "all equal", yes(v["all_equal"])))
    limit = t["weight_bytes"] + LOAD_RSS_SLACK
    for key, what in ((f"load_converted_{big}", "converted dir"), (f"load_hf_{big}", "HF dir")):
        if key in r:
            rows.append((f"`zaya_jax.load` ({what}, bf16)", f"{r[key]['seconds']:.0f} s; peak RSS {gib(r[key]['peak_rss_bytes'])}",
                         f"<= weights + 3 GiB = {gib(limit)}", yes(r[key]["peak_rss_bytes"] <= limit)))
    run = r.get(f"run_{big}")
    if run:
        floor = t.get("decode_floor_seconds_per_token")
        bw = r.get("bandwidth", {}).get("read_gb_per_s")
        floor_text = (f"floor {floor:.3f} s/token = {t['bytes_per_token']['total'] / 1e9:.2f} GB / {bw:.1f} GB/s"
                      if floor else "floor: run the bandwidth step")
        ratio = t.get("decode_floor_ratio")
        huge = run.get("huge_page_bytes")
        rows.append((f"greedy decode, {TIMED_TOKENS} tokens, bf16 (median of {run['repeats']})",
                     f"{run['decode_seconds_per_token']:.3f} s/token"
                     + (f" = **{ratio:.2f}x** the floor" if ratio else "") + f" ({floor_text}); prefill of 16 tokens "
                     f"{run['prefill_seconds_median']:.1f} s"
                     + (f"; weights on huge pages: {gib(huge)} of {gib(run['param_bytes'])}" if huge is not None else ""),
                     f"<= {DECODE_FLOOR_TARGET:g}x the floor", yes(ratio <= DECODE_FLOOR_TARGET) if ratio else "-"))
        rows.append(("process peak RSS: load + 64-token forward + generation", gib(run["peak_rss_bytes"]), "< 24 GiB host",
                     yes(run["peak_rss_bytes"] < 24 * GIB)))
    g = r.get(f"zaya_generate_{big}")
    if g:
        rows.append(("`zaya generate --compute-dtype bfloat16 --max-new-tokens 16`", f"{g['seconds']:.0f} s wall (load + compile + run); "
                     f"peak RSS {gib(g['peak_rss_bytes'])}", "< 24 GiB host", yes(g["peak_rss_bytes"] < 24 * GIB)))
    c = r.get(f"compare_{big}")
    if c:
        rows.append((f"prefill logits vs transformers bf16 ({c['positions']} positions)",
                     f"top-1 agreement {c['top1_agreement']:.3f} (top-1 is the input token at {c['top1_is_input_token']:.2f}); "
                     f"best other token {c['top1_excluding_input_token_agreement']:.3f}; top-5 overlap {c['top5_overlap']:.3f}; "
                     f"max abs logit diff {c['max_abs_logit_diff']:.1f} of max {c['max_abs_logit']:.0f}",
                     ">= 0.99", yes(c["top1_agreement"] >= 0.99)))
    lines = [f"ZAYA1-8B shapes, {big} layers, bfloat16: weights {gib(t['weight_bytes'])}", "",
             "| step | measured | target | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write the synthetic checkpoint")
    w.add_argument("path")
    w.add_argument("--layers", type=int, default=40)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--legacy", action="store_true", help="80-layer legacy layout (per-expert tensors, legacy config)")
    a = sub.add_parser("all", help="run the steps in order, each measured one in a fresh process")
    a.add_argument("--workdir", required=True, help="where checkpoints and results.json go (outside the repository)")
    a.add_argument("--layers", type=int, default=40)
    a.add_argument("--small-layers", type=int, default=4, help="the second size for the convert-memory comparison")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--legacy", action="store_true", help="write the checkpoints in the legacy layout")
    a.add_argument("--steps", default=None, help=f"comma-separated subset of {','.join(STEPS)}")
    a.add_argument("--repeats", type=int, default=3)
    a.add_argument("--quantize", choices=("int8", "int4"), default="int8",
                   help="the quantize / quantized_run / quantized_generate steps' scheme (default int8)")
    a.add_argument("--verify-sample-layers", type=int, default=None, help="check this many layers per leaf (default all)")
    a.add_argument("--clean", action="store_true", help="delete the checkpoints at the end")
    a.add_argument("--min-available-gib", type=float, default=None,
                   help="skip (and record) a whole-model step when the host has less memory available")
    a.add_argument("--reuse-small", action="store_true",
                   help="keep the --small-layers checkpoint and its write/convert figures from an earlier run")
    a.add_argument("--rss-limit-gib", type=float, default=None,
                   help="stop any step whose process grows past this many GiB (a guard on shared machines)")
    # hidden per-step entry points, each run in its own process
    for name in ("_load", "_run", "_hf"):
        s = sub.add_parser(name)
        s.add_argument("model")
        if name != "_load":
            s.add_argument("--logits", required=True)
        s.add_argument("--repeats", type=int, default=3)
    s = sub.add_parser("_write")
    s.add_argument("path")
    s.add_argument("--layers", type=int, default=40)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--legacy", action="store_true")
    s = sub.add_parser("_verify")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--sample-layers", type=int, default=None)
    s = sub.add_parser("_bandwidth")
    s.add_argument("--repeats", type=int, default=5)
    s = sub.add_parser("_cli")
    s.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    if args.cmd == "all" and args.rss_limit_gib:
        os.environ["ZAYA_BENCH_RSS_LIMIT"] = str(int(args.rss_limit_gib * GIB))  # inherited by the steps
    if args.cmd.startswith("_") and os.environ.get("ZAYA_BENCH_RSS_LIMIT"):
        start_watchdog(int(os.environ["ZAYA_BENCH_RSS_LIMIT"]))

    if args.cmd in ("write", "_write"):
        out = write_checkpoint(args.path, args.layers, args.seed, args.legacy)
    elif args.cmd == "all":
        results = run_all(args)
        if args.clean:
            for name in os.listdir(args.workdir):
                if name.startswith(("hf-", "converted-")):
                    shutil.rmtree(os.path.join(args.workdir, name))
        return 0 if all(v for k, v in results["targets"].items() if k.endswith("_ok")) else 1
    elif args.cmd == "_verify":
        from zaya_jax.formats.checksums import verify

        out = verify(args.src, args.dst, args.sample_layers)
    else:
        out = {"_load": _load, "_run": _run, "_hf": _hf, "_bandwidth": _bandwidth, "_cli": _cli}[args.cmd](args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
