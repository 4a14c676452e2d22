"""Logit error of quantized demo models against the unquantized one, on a fixed batch of demo prompts.

    zaya convert zaya_jax/demo/model work/q/demo-int8 --quantize int8     # and int4
    python bench/quant_logits.py work/q/demo-int8 work/q/demo-int4 [--problems 64] [--json]

The batch: the first ``--problems`` held-out problems (the ones ``zaya demo`` scores), each as a solving
chat (question, gold solution) and as a Markov RSA aggregation chat (question plus 4 candidate tails,
the boxed answer as the reply; ``zaya_jax.demo.data``, seed 0), left-padded into one batch. Every
model runs the same forward in its stored dtype; the figures are ``full_size.compare``'s over every
real position, and again over the positions that predict a reply token (what the model is asked to write),
with the median and 99th percentile of each position's max abs difference.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
from full_size import compare

from zaya_jax.cli import resolve_model
from zaya_jax.demo import DEFAULT_MODEL_DIR, arith
from zaya_jax.demo.data import aggregate_record, solve_record
from zaya_jax.infer.tokenizer import Tokenizer
from zaya_jax.model import forward
from zaya_jax.train.data import chat_example


def demo_batch(problems: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, attention_mask, reply_mask)``, each ``[2 * problems, S]``, left-padded; ``reply_mask`` marks
    the positions whose next token is a reply token."""
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    rng = random.Random(seed)
    examples = []
    for prob in arith.problems("test", problems):
        examples.append(chat_example(solve_record(prob)["messages"], tokenizer))
        examples.append(chat_example(aggregate_record(prob, rng, target="answer")["messages"], tokenizer))
    width = max(len(e.ids) for e in examples)
    ids, attention, reply = (np.zeros((len(examples), width), np.int32) for _ in range(3))
    for row, e in enumerate(examples):
        n = len(e.ids)
        ids[row, width - n:], attention[row, width - n:] = e.ids, 1
        reply[row, width - n:width - 1] = e.loss_mask[1:]
    return ids, attention, reply


def logits_of(model: str, ids: np.ndarray, attention: np.ndarray) -> np.ndarray:
    """Logits ``[B, S, V]`` float32 of the model in ``model`` (its stored dtype)."""
    config, params, _ = resolve_model(model)
    return np.asarray(forward(params, config, ids, attention))


def figures(logits: np.ndarray, reference: np.ndarray, ids: np.ndarray) -> dict:
    """``compare``'s figures for ``[P, V]`` logits, plus quantiles of each position's max abs difference
    (how many positions a max abs figure speaks for)."""
    per_position = np.abs(logits - reference).max(-1)
    return {**compare(logits, reference, ids.tolist()),
            **{f"position_max_abs_p{q}": float(np.quantile(per_position, q / 100)) for q in (50, 99)}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="quantized model directories (zaya convert --quantize)")
    parser.add_argument("--reference", default=DEFAULT_MODEL_DIR, help="the unquantized model (default: the shipped demo model)")
    parser.add_argument("--problems", type=int, default=64, help="held-out problems; two sequences each (default 64)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = parser.parse_args(argv)

    ids, attention, reply = demo_batch(args.problems)
    real, answer = attention.astype(bool), reply.astype(bool)
    reference = logits_of(args.reference, ids, attention)
    results = {"sequences": len(ids), "positions": int(real.sum()), "reply_positions": int(answer.sum())}
    for model in args.models:
        logits = logits_of(model, ids, attention)
        results[model] = {
            "all": figures(logits[real], reference[real], ids[real]),
            "reply": figures(logits[answer], reference[answer], ids[answer]),
        }
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{results['sequences']} sequences, {results['positions']} positions ({results['reply_positions']} reply)")
    for model in args.models:
        for part in ("all", "reply"):
            c = results[model][part]
            print(f"{model} [{part}]: max abs {c['max_abs_logit_diff']:.4f}, mean abs {c['mean_abs_logit_diff']:.4f}, "
                  f"top-1 agreement {c['top1_agreement']:.4f}, KL {c['mean_kl_jax_vs_hf']:.2e}; per-position max abs "
                  f"median {c['position_max_abs_p50']:.3f}, p99 {c['position_max_abs_p99']:.3f} (logit std {c['logit_std']:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
