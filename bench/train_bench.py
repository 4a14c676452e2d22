"""Training benchmark: one AdamW step of transformers' ZAYA (PyTorch CPU, eager, ``loss.backward()``)
vs zaya-jax's compiled train step, same config, same weights, same batch, measured side by side.

    python bench/train_bench.py [--config bench-124M] [--batch 4] [--seq 256] [--repeats 3]
                                [--remat none|full|dots] [--compute-dtype float32|bfloat16]

Both steps do the same work: forward, next-token cross-entropy over every token, backward, global-norm
clipping at 1.0 and an AdamW update (weight decay 0.1). After a warm-up step each (for zaya-jax it
includes compilation, reported separately) the two alternate step by step; figures are medians over
``--repeats`` steps each. The first step's
losses of both are printed as a check that they train the same model on the same batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

import zaya_jax
from zaya_jax.bench_configs import CONFIGS
from zaya_jax.train import step

LR, WEIGHT_DECAY, CLIP = 1e-4, 0.1, 1.0


def once(fn):
    """(seconds, result) of one call."""
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def hf_step(model, optimizer, ids, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    optimizer.step()
    return loss.item()


def run(name: str, batch: int, seq: int, repeats: int, remat: str, compute_dtype: str) -> None:
    torch.manual_seed(0)
    hf_config = transformers.ZayaConfig(**CONFIGS[name])
    hf_config._attn_implementation = "eager"
    model = transformers.ZayaForCausalLM(hf_config)
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        config, params = zaya_jax.load(path)
    model.train()
    ids = np.random.default_rng(0).integers(1, config.vocab_size, (batch, seq))
    tokens = batch * (seq - 1)  # predicted tokens per step

    # The same AdamW (no warmup; constant lr) on both sides.
    hf_opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=WEIGHT_DECAY)
    tcfg = step.TrainConfig(learning_rate=LR, warmup_steps=0, total_steps=10_000, final_lr_ratio=1.0,
                            weight_decay=WEIGHT_DECAY, clip_norm=CLIP, remat_policy=remat, compute_dtype=compute_dtype)
    train_step = step.make_train_step(config, tcfg)
    jbatch = {"tokens": jnp.asarray(ids, jnp.int32), "mask": jnp.ones(ids.shape, jnp.int32),
              "loss_mask": jnp.ones(ids.shape, jnp.int32)}
    holder = {"state": step.init_state(params, tcfg)}
    ids_t = torch.as_tensor(ids)

    def jax_step():
        holder["state"], metrics = train_step(holder["state"], jbatch)
        return float(metrics["loss"])  # waits for the step

    steps = {"transformers": lambda: hf_step(model, hf_opt, ids_t, ids_t), "zaya-jax": jax_step}
    # Warm-up (and compile), then the two alternate step by step, so load changes hit both alike.
    first = {k: once(fn) for k, fn in steps.items()}
    runs = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            runs[k].append(once(fn)[0])
    hf_t, jx_t = (statistics.median(runs[k]) for k in steps)

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{name} ({n_params / 1e6:.0f}M params): batch {batch} x {seq}, float32 master weights, "
          f"zaya-jax compute {compute_dtype}, remat {remat}; {jax.device_count()} jax device(s), "
          f"torch threads {torch.get_num_threads()}; median of {repeats} steps after a warm-up step")
    print("| train step (forward + backward + AdamW) | transformers | zaya-jax | ratio |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| seconds per step | {hf_t:.3f} | {jx_t:.3f} | {hf_t / jx_t:.2f}x |")
    print(f"| tokens/s | {tokens / hf_t:,.0f} | {tokens / jx_t:,.0f} | {hf_t / jx_t:.2f}x |")
    (hf_first, hf_loss), (jx_first, jx_loss) = first.values()
    print(f"\nfirst-step loss: transformers {hf_loss:.6f}, zaya-jax {jx_loss:.6f}; "
          f"zaya-jax compile + first step {jx_first:.1f} s (transformers first step {hf_first:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="bench-124M")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    jax.config.update("jax_platforms", "cpu")
    run(args.config, args.batch, args.seq, args.repeats, args.remat, args.compute_dtype)


if __name__ == "__main__":
    main()
