"""Markov RSA on a TPU topology, estimated from the engine's programs compiled ahead of time (``zaya plan``).

    python bench/tpu_rsa.py [--topology v5e:2x4] [--mesh expert=8] [--population 16] [--aggregate 4]
                            [--rounds 2] [--budget 8192] [--tail 4096] [--question 256] [--problems 1,4]

The ZAYA1 report's light setting by default: N=16 candidates, C=4 tails of tau=4K tokens per aggregation
prompt, T=2 aggregation rounds (3 generation stages), a budget of beta=8K new tokens per candidate. One
problem's work as the engine schedules it:

- stage 0: one prefill of the question (the N requests share one prompt, so one prefill row), then N rows
  decode ``budget`` steps;
- each of the T rounds: N aggregation prompts of ``question + C x tail`` tokens, prefilled in the engine's
  groups (rows x ``prefill_chunk`` per call, at most ``prefill_tokens``), then N rows decode ``budget`` steps.

Every candidate is taken to use its whole budget (an upper bound; the report's budgets are caps). With
``--problems P``, P problems run at once in ``P x N`` slots: the decode steps are shared, the prefills are
not. Each program's time is its roofline estimate per chip (``zaya_jax.aot``: FLOPs at the chip's peak,
bytes at its HBM bandwidth, whichever is longer), at the largest cache a stage reaches (a decode step at
the full cache length; a prefill chunk attending over its whole prompt bucket): estimates, not runs.
"""

from __future__ import annotations

import argparse
import json
import math


def estimate(args) -> dict:
    from zaya_jax import aot
    from zaya_jax import plan as pl
    from zaya_jax import sharding as shd
    from zaya_jax.config import ZayaConfig
    from zaya_jax.mesh import parse_mesh

    config = ZayaConfig()
    topo = aot.topology(args.topology)
    chip = aot.chip_of(topo.devices)
    mesh = shd.make_mesh(**parse_mesh(args.mesh), devices=topo.devices)
    N, C, T, beta, tau, q = args.population, args.aggregate, args.rounds, args.budget, args.tail, args.question
    agg = q + C * tau  # an aggregation prompt: the question and C tails (template tokens left out)
    cache = {"stage 0": q + beta, "rounds": agg + beta}

    def report(program):
        r = aot.plan_program(program, config, mesh, chip, full=False)
        if r.estimate_seconds is None:
            raise SystemExit(f"{program.name}: {r.note or r.error}")
        print(f"  {program.name}: {r.estimate_seconds * 1e3:.2f} ms (estimate), "
              f"{r.bytes_accessed / 1e9:.2f} GB, {r.flops / 1e12:.3f} TFLOP per chip", flush=True)
        return r.estimate_seconds

    out = {"topology": args.topology, "mesh": args.mesh, "chip": chip.name, "setting": dict(
        N=N, C=C, T=T, beta=beta, tau=tau, question=q, aggregation_prompt=agg), "problems": {}}
    for P in args.problems:
        slots = P * N
        rows = {}
        for stage, held in cache.items():
            s = pl.ServeSettings(slots=slots, max_len=held)
            programs, pool, *_ = pl.serve_programs(config, mesh, s, all_programs=True)
            decode_step = report(programs[0])
            if stage == "stage 0":
                S = pool.prompt_bucket(q)
                distinct = P  # the N requests of a problem share its question
            else:
                S = pool.prompt_bucket(agg)
                distinct = P * N
            chunk = pool.chunk(S)
            per_call = max(n for n in range(1, distinct + 1) if pool.admits(n, S))
            G = pool.rows(per_call)
            prefill = next(p for p in programs if p.name.startswith(f"prefill[rows={G},bucket={S},"))
            prefill_call = report(prefill)
            calls = math.ceil(distinct / per_call) * math.ceil((q if stage == "stage 0" else agg) / chunk)
            rows[stage] = {"decode_step_seconds": decode_step, "decode_steps": beta, "prefill_call_seconds": prefill_call,
                           "prefill_calls": calls, "prefill_program": prefill.name,
                           "seconds": beta * decode_step + calls * prefill_call}
        stages = [rows["stage 0"]] + [rows["rounds"]] * T
        total = sum(r["seconds"] for r in stages)
        out["problems"][P] = {"slots": slots, "stages": rows, "seconds": total, "minutes_per_problem": total / 60 / P,
                              "new_tokens_per_second": P * N * beta * (T + 1) / total}
        print(f"{P} problem(s) at once, {slots} slots: {total / 60:.1f} min for all, "
              f"{total / 60 / P:.1f} min per problem, {P * N * beta * (T + 1) / total:,.0f} new tokens/s (estimates)",
              flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5e:2x4")
    p.add_argument("--mesh", default="expert=8")
    p.add_argument("--population", type=int, default=16, help="N: candidates per round")
    p.add_argument("--aggregate", type=int, default=4, help="C: tails per aggregation prompt")
    p.add_argument("--rounds", type=int, default=2, help="T: aggregation rounds")
    p.add_argument("--budget", type=int, default=8192, help="beta: new tokens per candidate")
    p.add_argument("--tail", type=int, default=4096, help="tau: tokens of each candidate's tail")
    p.add_argument("--question", type=int, default=256, help="tokens of the question with its chat template")
    p.add_argument("--problems", default="1,4", help="problems run at once (comma-separated)")
    p.add_argument("--json", default=None, help="also write the estimate to this file")
    args = p.parse_args()
    args.problems = [int(x) for x in args.problems.split(",")]
    print(f"ZAYA1-8B bf16 Markov RSA on {args.topology}, mesh {args.mesh}; roofline estimates per chip", flush=True)
    out = estimate(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
