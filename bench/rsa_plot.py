"""Accuracy against generated tokens for Markov RSA with T = 0..4 on the demo task, as a PNG.

    pip install -e ".[plot]" && python bench/rsa_plot.py --out docs/rsa_accuracy.png

One Markov RSA run with ``--rounds 4`` gives every T at once: the state after round t is exactly the
run with T = t (rounds are not revisited). Each point is the mean accuracy of that round's candidates
(and, dashed, the majority vote), against the tokens generated up to it.
"""

from __future__ import annotations

import argparse
import json
import os

import zaya_jax
from zaya_jax.demo import DEFAULT_MODEL_DIR, DEMO_TEMPERATURE, arith
from zaya_jax.demo.evaluate import evaluate, format_table
from zaya_jax.infer.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_DIR)
    parser.add_argument("--problems", type=int, default=200)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=DEMO_TEMPERATURE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/rsa_accuracy.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config, params = zaya_jax.load(args.model)
    rows, info = evaluate(params, config, Tokenizer.from_dir(args.model), arith.problems("test", args.problems),
                          population=args.population, rounds=args.rounds, temperature=args.temperature,
                          seed=args.seed)
    print(format_table(rows, info))
    rsa_rows = [r for r in rows if r.method.startswith("Markov RSA round") and "majority" not in r.method]
    single, vote = rows[0], rows[1]
    tokens = [vote.tokens] + [r.tokens for r in rsa_rows]
    accuracy = [single.accuracy] + [r.accuracy for r in rsa_rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(tokens, accuracy, "o-", label="Markov RSA: mean accuracy of round-T candidates")
    for t, (x, y) in enumerate(zip(tokens, accuracy)):
        ax.annotate(f"T={t}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.axhline(vote.accuracy, color="gray", linestyle="--", label=f"majority vote of T=0 (N={args.population})")
    ax.set_xlabel(f"generated tokens ({args.problems} held-out problems)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Demo model, N={args.population}, C={info['tails']}, tau={info['tail_tokens']}, "
                 f"temperature {args.temperature}")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    stem, ext = os.path.splitext(args.out)
    fig.savefig(stem + ".tmp" + ext)  # written whole, then renamed: never a half-written figure
    with open(stem + ".json.tmp", "w") as f:
        json.dump({**info, "rows": [r.__dict__ for r in rows]}, f, indent=1)
    os.replace(stem + ".tmp" + ext, args.out)
    os.replace(stem + ".json.tmp", stem + ".json")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
