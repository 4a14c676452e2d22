"""``zaya train``: fine-tune a model directory on a JSONL file; resumable; writes a loadable model."""

from __future__ import annotations

import dataclasses
import json
import os

from zaya_jax.cli import DTYPES, add_deprecated_alias, add_model_arg, add_non_finite_arg, bounded_arg, seed_arg
from zaya_jax.model import REMAT_POLICIES

from .loop import RunConfig
from .step import COMPUTE_DTYPES, TrainConfig


def mesh_arg(text: str | None):
    """The mesh a `--mesh data=..,fsdp=..` argument names; None for none."""
    if not text:
        return None
    from zaya_jax import sharding

    return sharding.make_mesh(**sharding.parse_mesh(text))


def from_args(cls, args, **given):
    """A ``cls`` dataclass of the options named as its fields (each option's ``dest`` is the field's name),
    ``given`` taking precedence; a field neither holds keeps its default."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{**{k: v for k, v in vars(args).items() if k in names}, **given})


def check_run_out(args) -> None:
    """Refuses an ``--out`` where a run would write (or ``--force`` delete) its ``--data`` or ``--model``, and
    one that another run is writing (before the model loads; the run itself holds the lock, ``loop.open_out``)."""
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.outputs import OutputLock, check_outputs

    from .loop import OUTPUTS

    check_outputs({f"--out's {name}": os.path.join(args.out, name) for name in OUTPUTS},
                  {"--data": args.data, "--model": args.model or DEFAULT_MODEL_DIR})
    if os.path.isdir(args.out):
        OutputLock(args.out, "--out").close()


def closing_figure(value, digits: int = 4) -> str:
    """A logged figure for the closing line ("none" when the run logged no step)."""
    return "none" if value is None else f"{value:.{digits}f}"


def _train_command(args) -> int:
    from zaya_jax.cli import resolve_model
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.infer.tokenizer import Tokenizer
    from zaya_jax.validate import InputError

    from . import data, loop

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

    warmup = args.warmup_steps if args.warmup_steps is not None else min(TrainConfig.warmup_steps, args.steps // 10)
    tcfg = from_args(TrainConfig, args, warmup_steps=warmup, total_steps=args.steps)
    run = from_args(RunConfig, args)
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
    add_model_dtype_args(p)
    p.add_argument("--data", required=True, help="JSONL: {\"text\"}, {\"messages\"} (loss on assistant turns) "
                   "or {\"input_ids\", \"loss_mask\"} per line")
    p.add_argument("--out", required=True, help="output directory: checkpoints/, metrics.jsonl, model/")
    p.add_argument("--steps", type=int, default=TrainConfig.total_steps,
                   help="total optimizer steps (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=512,
                   help="tokens per sequence; longer records are cut (default %(default)s)")
    add_step_args(p, f"linear warmup steps (default min({TrainConfig.warmup_steps}, steps/10))")
    add_deprecated_alias(p, "--clip", "use --grad-clip", dest="clip_norm", type=float)
    p.add_argument("--save-every", type=int, default=RunConfig.save_every,
                   help="checkpoint interval in steps (default %(default)s)")
    p.add_argument("--keep", type=int, default=RunConfig.keep, help="checkpoints kept (default %(default)s)")
    p.add_argument("--seed", type=seed_arg, default=RunConfig.seed, help="data order seed (default %(default)s)")
    add_run_args(p)


def add_model_dtype_args(p) -> None:
    """MODEL (``--model`` before) and --dtype of `zaya train` and `zaya rl`."""
    add_model_arg(p, None, former_option=True)
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="dtype the weights are stored in: the model loads in it and the trained one is saved in it "
                        "(default: as stored); training keeps float32 masters and runs in --compute-dtype")


def add_step_args(p, warmup_help: str) -> None:
    """The optimizer and train-step options `zaya train` and `zaya rl` share; their defaults are
    ``TrainConfig``'s (rl sets its own learning-rate schedule's with ``set_defaults``)."""
    p.add_argument("--lr", dest="learning_rate", metavar="LR", type=float, default=TrainConfig.learning_rate,
                   help="peak learning rate (default %(default)s)")
    p.add_argument("--warmup", dest="warmup_steps", metavar="WARMUP", type=int, default=None, help=warmup_help)
    p.add_argument("--final-lr-ratio", type=float, default=TrainConfig.final_lr_ratio,
                   help="cosine decays to lr x this (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help="AdamW decay of matrices (default %(default)s)")
    p.add_argument("--grad-clip", dest="clip_norm", metavar="GRAD_CLIP", type=float, default=TrainConfig.clip_norm,
                   help="global gradient-norm clip (default %(default)s)")
    p.add_argument("--grad-accum", type=bounded_arg(1), default=TrainConfig.grad_accum,
                   help="micro-batches per optimizer step (default %(default)s)")
    p.add_argument("--remat", dest="remat_policy", choices=tuple(REMAT_POLICIES), default=TrainConfig.remat_policy,
                   help="per-layer rematerialisation policy (default %(default)s)")
    p.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=TrainConfig.compute_dtype,
                   help="forward/backward dtype; master weights stay float32 (default %(default)s)")
    p.add_argument("--bias-rate", type=float, default=TrainConfig.bias_rate, help="sign-rule step of the expert "
                   "balancing biases per optimizer step; 0 freezes them (default %(default)s)")
    p.add_argument("--loss-chunk", type=int, default=TrainConfig.loss_chunk,
                   help="tokens per loss chunk (default: ~64M logits)")


def add_run_args(p) -> None:
    """The run options `zaya train` and `zaya rl` share: mesh, resume/force, progress, output."""
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=2,fsdp=2,expert=2 (default: one device)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--force", action="store_true", help="start afresh in an --out that holds an earlier run's "
                   "checkpoints/, model/, metrics.jsonl or run.json, deleting them")
    add_non_finite_arg(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the final summary as one JSON object")
