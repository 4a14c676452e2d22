"""Builds everything the demo model's training starts from, in one directory.

``python -m zaya_jax.demo.build OUT`` writes ``OUT/init`` (a freshly initialised demo ZAYA in the
native HF layout with its tokenizer and chat template), ``OUT/train.jsonl`` (stage 1) and
``OUT/aggregate.jsonl`` (stage 2, on problems stage 1 does not use), then prints the two ``zaya train``
commands and the ``zaya export`` that produce the shipped model (see docs/demo_model.md).
"""

from __future__ import annotations

import argparse
import os

import jax

from zaya_jax.config import ZayaConfig
from zaya_jax.model import init

from . import data, vocab

DEMO_CONFIG = ZayaConfig(
    vocab_size=len(vocab.SPECIALS) + len(vocab.CHARACTERS),
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=128,
    num_experts=16,
    router_hidden_size=32,
    max_position_embeddings=1024,
    # A short-context model: theta 1e4 (ZAYA1-8B's 5e6 hardly rotates over a few hundred positions,
    # which makes copying digits from the question slow to learn at this size).
    rope_theta=(("hybrid", 10_000.0), ("hybrid_sliding", 10_000.0)),
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=(4,),  # <end_of_turn>
)
TRAIN_EXAMPLES = 100_000
SEQ_LEN = 208  # the longest training example (a 5-term aggregation prompt and its target) is 202 tokens
# The rest of the two `zaya train` commands that produced the shipped model (docs/demo_model.md):
# stage 1 from the fresh init on train.jsonl, stage 2 from stage 1's model on aggregate.jsonl.
TRAIN_ARGS = {1: f"--steps 2000 --batch-size 32 --seq-len {SEQ_LEN} --lr 3e-3 --warmup 100 --seed 0",
              2: f"--steps 800 --batch-size 32 --seq-len {SEQ_LEN} --lr 1e-3 --warmup 50 --seed 0"}
# The reference initialises the key temperature to 0 (uniform attention); Adam then needs most of a
# short run just to grow it. A small model trained from scratch starts with sharp-enough attention.
INITIAL_KEY_TEMPERATURE = 2.0


def build(out: str, examples: int = TRAIN_EXAMPLES, seed: int = 0) -> tuple[str, str, str]:
    """Writes the initial model directory and both stages' training data; returns their paths."""
    from zaya_jax.convert import save_hf

    os.makedirs(out, exist_ok=True)
    model_dir, data_file = os.path.join(out, "init"), os.path.join(out, "train.jsonl")
    stage2_file = os.path.join(out, "aggregate.jsonl")
    params = init(DEMO_CONFIG, jax.random.key(seed))
    params["layers"]["attn"]["temp"] = params["layers"]["attn"]["temp"] + INITIAL_KEY_TEMPERATURE
    save_hf(params, DEMO_CONFIG, model_dir, force=True)
    vocab.write(model_dir)
    data.write_training_data(data_file, examples, seed)
    data.write_training_data(stage2_file, data.STAGE2_EXAMPLES, seed, stage=2, first_problem=examples)
    return model_dir, data_file, stage2_file


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory for init/, train.jsonl and aggregate.jsonl")
    parser.add_argument("--examples", type=int, default=TRAIN_EXAMPLES, help="stage 1 examples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model_dir, data_file, stage2_file = build(args.out, args.examples, args.seed)
    print(f"wrote {model_dir}, {data_file} and {stage2_file}; the shipped model came from:")
    run1, run2 = os.path.join(args.out, "run"), os.path.join(args.out, "run2")
    print(f"  zaya train {model_dir} --data {data_file} --out {run1} {TRAIN_ARGS[1]}")
    print(f"  zaya train {os.path.join(run1, 'model')} --data {stage2_file} --out {run2} {TRAIN_ARGS[2]}")
    print(f"  zaya export {os.path.join(run2, 'model')} zaya_jax/demo/model --force")


if __name__ == "__main__":
    main()
