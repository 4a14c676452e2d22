"""lm-evaluation-harness against `zaya serve`, checked against the same scoring done directly with `forward`.

Starts `zaya serve` on the demo model (or takes --url of one), runs lm-eval's ``zaya_arith_choice`` task
(bench/lm_eval_tasks: multiple choice by log-likelihood) with model ``local-completions`` and the demo
model's tokenizer, then scores every (context, choice) pair itself: the pair split as lm-eval splits it
(the context's trailing whitespace moves to the continuation; the continuation is what the whole text
encodes to past the context's tokens), the continuation's log-likelihood summed from
``zaya_jax.forward``'s log-softmax in float32. It prints lm-eval's and the direct accuracy and acc_norm
(log-likelihood per character of the choice) and the largest per-choice log-likelihood difference;
``--json OUT`` writes them with every choice's two log-likelihoods.

    pip install -e ".[serve,lm-eval]"
    python bench/lm_eval_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import numpy as np

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_eval_tasks")
TASK = "zaya_arith_choice"
MODEL = "zaya-demo"


def lm_eval_scores(url: str, batch_size: int) -> tuple[dict, list[list[float]]]:
    """lm-eval's metrics of the task against the server at ``url`` and each doc's choice log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from zaya_jax.demo import DEFAULT_MODEL_DIR

    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=[TASK], task_manager=TaskManager(include_path=TASKS_DIR),
        model_args={"model": MODEL, "base_url": f"{url}/v1/completions", "tokenizer_backend": "huggingface",
                    "tokenizer": str(DEFAULT_MODEL_DIR), "batch_size": batch_size, "max_retries": 1},
        log_samples=True, bootstrap_iters=0)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    metrics = {k.split(",")[0]: v for k, v in out["results"][TASK].items() if k in ("acc,none", "acc_norm,none")}
    return metrics, [[float(r[0][0]) for r in s["resps"]] for s in samples]


def split_pair(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's split of a pair: trailing whitespace of the context moves to the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def direct_scores(rows: list[dict], batch: int = 32) -> list[list[float]]:
    """Each doc's choice log-likelihoods from ``forward`` (left-padded batches of one length: one compile)."""
    import jax

    from zaya_jax import forward, load
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.infer.tokenizer import Tokenizer

    config, params = load(DEFAULT_MODEL_DIR)
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    seqs, starts = [], []
    for row in rows:
        for choice in row["choices"]:
            context, continuation = split_pair(row["context"], choice)
            seqs.append(tok.encode(context + continuation, add_special_tokens=False))
            starts.append(len(tok.encode(context, add_special_tokens=False)))
    width = max(map(len, seqs))
    scores = []
    for b in range(0, len(seqs), batch):
        part = seqs[b:b + batch]
        ids, mask = np.zeros((batch, width), np.int32), np.zeros((batch, width), np.int32)
        for i, s in enumerate(part):
            ids[i, width - len(s):], mask[i, width - len(s):] = s, 1
        mask[len(part):, -1] = 1  # padding rows: one token, never read
        logp = np.asarray(jax.nn.log_softmax(forward(params, config, ids, mask), axis=-1))
        for i, (s, start) in enumerate(zip(part, starts[b:b + batch])):
            pos = width - len(s) + np.arange(start, len(s))  # the positions of the continuation's tokens
            scores.append(float(logp[i, pos - 1, np.asarray(s)[start:]].sum()))
    per_doc, k = [], 0
    for row in rows:
        per_doc.append(scores[k:k + len(row["choices"])])
        k += len(row["choices"])
    return per_doc


def accuracy(rows: list[dict], scores: list[list[float]]) -> dict:
    """acc (the likeliest choice is the gold one) and acc_norm (by log-likelihood per character), as lm-eval's."""
    acc = [int(np.argmax(s)) == r["gold"] for r, s in zip(rows, scores)]
    norm = [int(np.argmax(np.asarray(s) / [len(c) for c in r["choices"]])) == r["gold"] for r, s in zip(rows, scores)]
    return {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(norm))}


def compare(url: str, batch_size: int) -> dict:
    sys.path.insert(0, TASKS_DIR)
    import arith_choice_docs

    rows = arith_choice_docs.rows()
    harness_metrics, harness = lm_eval_scores(url, batch_size)
    direct = direct_scores(rows)
    diff = max(abs(a - b) for h, d in zip(harness, direct) for a, b in zip(h, d))
    return {"docs": len(rows), "choices": sum(len(r["choices"]) for r in rows), "lm_eval": harness_metrics,
            "direct": accuracy(rows, direct), "max_abs_loglikelihood_diff": diff,
            "loglikelihoods": {"lm_eval": harness, "direct": direct}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running `zaya serve` of the demo model (default: start one)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per request lm-eval sends")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from zaya_jax.infer.serve.launch import running_server

            url = stack.enter_context(running_server("--slots", "8", env=dict(os.environ, JAX_PLATFORMS="cpu")))
        out = compare(url, args.batch_size)
    print(json.dumps({k: v for k, v in out.items() if k != "loglikelihoods"}, indent=1))
    if args.json:  # whole or not at all: written beside, then renamed
        with open(args.json + ".tmp", "w") as f:
            json.dump(out, f, indent=1)
        os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
