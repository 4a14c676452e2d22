"""Demo problems as a ``zaya eval`` / ``zaya rl`` JSONL file (``{"id", "question", "answer"}`` lines).

``python -m zaya_jax.demo.problems OUT.jsonl [--count N] [--split train|test] [--start I]``. The default
training-split slice starts past every problem the shipped model's two SFT stages used (the first
140,000), so RL sees problems the model was never trained on; the test split is the held-out one.
"""

from __future__ import annotations

import argparse
import json

from . import arith

RL_START = 200_000  # training-split index where RL problems start (SFT used indices below 140,000)


def write(path: str, count: int, split: str = "train", start: int = RL_START) -> None:
    with open(path, "w") as f:
        for i, p in enumerate(arith.problems(split, count, start)):
            f.write(json.dumps({"id": f"{split}-{start + i}", "question": p.question, "answer": p.answer}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="JSONL file to write")
    parser.add_argument("--count", type=int, default=10_000, help="problems (default 10000)")
    parser.add_argument("--split", choices=tuple(arith.SPLITS), default="train")
    parser.add_argument("--start", type=int, default=None,
                        help=f"first problem index (default {RL_START} for train, 0 for test)")
    args = parser.parse_args(argv)
    start = args.start if args.start is not None else (RL_START if args.split == "train" else 0)
    write(args.out, args.count, args.split, start)
    print(f"wrote {args.count} {args.split} problems from index {start} to {args.out}")


if __name__ == "__main__":
    main()
