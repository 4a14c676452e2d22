"""``zaya train``: fine-tune a model directory on a JSONL file; resumable; writes a loadable model."""

from __future__ import annotations

import json
import os

from zaya_jax.cli import add_non_finite_arg, bounded_arg, seed_arg


def mesh_arg(text: str | None):
    """The mesh a `--mesh data=..,fsdp=..` argument names; None for none."""
    if not text:
        return None
    from zaya_jax import sharding

    return sharding.make_mesh(**sharding.parse_mesh(text))


def check_run_out(args) -> None:
    """Refuses an ``--out`` where a run would write (or ``--force`` delete) its ``--data`` or ``--model``."""
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.outputs import check_outputs

    from .loop import OUTPUTS

    check_outputs({f"--out's {name}": os.path.join(args.out, name) for name in OUTPUTS},
                  {"--data": args.data, "--model": args.model or DEFAULT_MODEL_DIR})


def closing_figure(value, digits: int = 4) -> str:
    """A logged figure for the closing line ("none" when the run logged no step)."""
    return "none" if value is None else f"{value:.{digits}f}"


def _train_command(args) -> int:
    from zaya_jax.cli import resolve_model
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.infer.tokenizer import Tokenizer
    from zaya_jax.validate import InputError

    from . import data, loop, step

    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    check_run_out(args)
    mesh = mesh_arg(args.mesh)
    config, params, desc = resolve_model(args.model, args.dtype, args.allow_non_finite)  # the loop places it on the mesh
    if args.seq_len > config.max_position_embeddings:
        raise InputError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings="
                         f"{config.max_position_embeddings}")
    model_dir = args.model or DEFAULT_MODEL_DIR
    has_tokenizer = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(model_dir) if has_tokenizer else None
    eos = config.eos_token_id[0] if config.eos_token_id else None
    examples, report = data.load_examples(args.data, args.seq_len, config.vocab_size, tokenizer, eos)
    print(f"model: {desc}\ndata: {report.examples} examples from {args.data} "
          f"({report.truncated} truncated to {args.seq_len} tokens, {report.dropped} without targets dropped)")

    warmup = args.warmup if args.warmup is not None else min(100, args.steps // 10)
    tcfg = step.TrainConfig(
        learning_rate=args.lr, warmup_steps=warmup, total_steps=args.steps, final_lr_ratio=args.final_lr_ratio,
        weight_decay=args.weight_decay, clip_norm=args.clip, grad_accum=args.grad_accum, remat_policy=args.remat,
        compute_dtype=args.compute_dtype, bias_rate=args.bias_rate, loss_chunk=args.loss_chunk)
    run = loop.RunConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, seed=args.seed,
                         save_every=args.save_every, keep=args.keep)
    batches = data.Batches(examples, args.batch_size, args.seq_len, args.seed, pad_id=config.pad_token_id or 0)
    data_settings = {"model": os.path.abspath(args.model) if args.model else None,
                     "data": os.path.abspath(args.data), "sha256": data.file_sha256(args.data),
                     "examples": len(examples)}
    state = loop.train(config, params, batches, tcfg, run, args.out, resume=args.resume, force=args.force,
                       mesh=mesh, data_settings=data_settings, progress=not args.no_progress, assets_from=model_dir)
    summary = {"steps": int(state.step), "loss": loop.last_metrics(args.out).get("loss"),
               "model": os.path.join(args.out, "model"), "metrics": os.path.join(args.out, "metrics.jsonl")}
    print(json.dumps(summary) if args.json else
          f"done: {summary['steps']} steps, last loss {closing_figure(summary['loss'])}; model in {summary['model']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model on a JSONL file (text, chat or token ids)")
    p.set_defaults(func=_train_command)
    p.add_argument("--model", default=None, help="model directory: HF checkpoint or `zaya convert` output "
                   "(default: the embedded model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype the trained model is saved in (default: as stored); training keeps float32 masters")
    p.add_argument("--data", required=True, help="JSONL: {\"text\"}, {\"messages\"} (loss on assistant turns) "
                   "or {\"input_ids\", \"loss_mask\"} per line")
    p.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--steps", type=int, default=1000, help="total optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sequence; longer records are cut (default 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, default=None, help="linear warmup steps (default min(100, steps/10))")
    p.add_argument("--final-lr-ratio", type=float, default=0.1, help="cosine decays to lr x this (default 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (default 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    add_step_args(p)
    p.add_argument("--save-every", type=int, default=100, help="checkpoint interval in steps (default 100)")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    p.add_argument("--seed", type=seed_arg, default=0, help="data order seed (default 0)")
    add_run_args(p)


def add_step_args(p) -> None:
    """The train-step options `zaya train` and `zaya rl` share."""
    p.add_argument("--grad-accum", type=bounded_arg(1), default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="per-layer rematerialisation policy (default none)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="forward/backward dtype; master weights stay float32 (default float32)")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="sign-rule step of the expert balancing biases "
                   "per optimizer step; 0 freezes them (default 1e-3)")
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per loss chunk (default: ~64M logits)")


def add_run_args(p) -> None:
    """The run options `zaya train` and `zaya rl` share: mesh, resume/force, progress, output."""
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,expert=2 (default: one device)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start afresh in an --out that holds an earlier run's "
                   "checkpoints/, model/, metrics.jsonl or run.json, deleting them")
    add_non_finite_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
