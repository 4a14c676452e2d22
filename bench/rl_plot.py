"""Reward curves of `zaya rl` runs: the training rollouts' mean reward per RL step (and its moving mean).

``python bench/rl_plot.py RUN [RUN ...] --out docs/rl_reward.png`` (needs ``pip install -e ".[plot]"``);
each RUN is a `zaya rl` output directory, drawn one after the other on a common step axis (a solve run,
then the aggregation run that started from its model).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def read(run: str) -> list[dict]:
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="zaya rl output directories, in training order")
    parser.add_argument("--out", default="docs/rl_reward.png")
    parser.add_argument("--window", type=int, default=10, help="moving-mean window in steps (default 10)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    offset = 0
    for run in args.runs:
        records = read(run)
        with open(os.path.join(run, "run.json")) as f:
            task = json.load(f)["rl"]["task"]
        steps = offset + np.array([r["step"] for r in records])
        reward = np.array([r["reward_mean"] for r in records])
        line, = ax.plot(steps, reward, ".", alpha=0.35)
        k = min(args.window, len(reward))
        smooth = np.convolve(reward, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, "-", color=line.get_color(), label=f"{task} ({os.path.basename(run)}), "
                f"{k}-step mean")
        offset = steps[-1]
    ax.set_xlabel("RL step")
    ax.set_ylabel("mean reward of the step's rollouts (temperature 1)")
    ax.set_title("zaya rl on the demo model: training rollouts", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
