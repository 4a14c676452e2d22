"""The ``zaya`` command. Subcommands live with the code they run and register here."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

# Modules exposing ``register(subparsers)``; each adds its subcommand(s) with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "zaya_jax.cli", "zaya_jax.demo.cli", "zaya_jax.convert.cli", "zaya_jax.infer.cli", "zaya_jax.infer.rsa_cli",
    "zaya_jax.infer.serve.cli",
    "zaya_jax.train.cli",
)


def resolve_model(path: str | None, dtype: str | None = None):
    """``(config, params, description)`` for a model directory; None means the shipped demo model."""
    import jax.numpy as jnp

    from . import checkpoint
    from .demo import DEFAULT_MODEL_DIR

    jdtype = {None: None, "float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    path = path or DEFAULT_MODEL_DIR
    config, params = checkpoint.load(path, dtype=jdtype)
    return config, params, "the shipped demo model (trained on multi-term addition)" if is_demo_model(path) else path


def is_demo_model(path: str | None) -> bool:
    """Whether ``path`` (None: no model given) is the shipped demo model."""
    from .demo import DEFAULT_MODEL_DIR

    return path is None or os.path.abspath(path) == os.path.abspath(DEFAULT_MODEL_DIR)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from .demo import DEFAULT_MODEL_DIR

    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL_DIR,
                        help="model directory (HF checkpoint or `zaya convert` output); default: the shipped demo model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="compute dtype (default: stored)")


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise SystemExit(f"error: --prompt-ids must be comma-separated integers: {e}")
    if not ids:
        raise SystemExit("error: --prompt-ids is empty")
    return ids


def _forward_command(args) -> int:
    import numpy as np

    from .model import forward

    config, params, desc = resolve_model(args.model, args.dtype)
    ids = parse_ids(args.prompt_ids)
    bad = [i for i in ids if not 0 <= i < config.vocab_size]
    if bad:
        raise SystemExit(f"error: token id(s) {bad} outside the vocabulary [0, {config.vocab_size})")
    logits = np.asarray(forward(params, config, np.array([ids])))[0, -1]
    top = np.argsort(-logits)[: args.top]
    result = {"model": desc, "prompt_ids": ids, "next_token_top": [[int(t), float(logits[t])] for t in top]}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model: {desc}")
        print(f"prompt: {len(ids)} tokens; next-token top-{args.top} (id: logit):")
        for t, v in result["next_token_top"]:
            print(f"  {t:>8d}: {v:+.4f}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("forward", help="run one forward pass and print the next-token top-k logits")
    add_model_args(p)
    p.add_argument("--prompt-ids", default="2,10,20,30", help="comma-separated token ids (default: 2,10,20,30)")
    p.add_argument("--top", type=int, default=5, help="how many next-token candidates to print")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_forward_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zaya", description="ZAYA1 in JAX: run, convert, generate, search, train.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError) as e:  # ConfigError / CheckpointError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
