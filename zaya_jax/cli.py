"""The ``zaya`` command. Subcommands live with the code they run and register here."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import signal
import sys
import threading

# Modules exposing ``register(subparsers)``; each adds its subcommand(s) with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "zaya_jax.cli", "zaya_jax.demo.cli", "zaya_jax.convert.cli", "zaya_jax.infer.cli", "zaya_jax.infer.rsa_cli",
    "zaya_jax.infer.eval_cli", "zaya_jax.infer.serve.cli", "zaya_jax.train.cli", "zaya_jax.train.rl_cli",
    "zaya_jax.plan_cli",
)


def resolve_model(path: str | None, dtype: str | None = None, allow_non_finite: bool = False):
    """``(config, params, description)`` for a model directory; None means the shipped demo model.

    A weight holding NaN or Inf is refused (CheckpointError naming it) unless ``allow_non_finite``."""
    from . import checkpoint
    from .demo import DEFAULT_MODEL_DIR, is_demo_model

    path = path or DEFAULT_MODEL_DIR
    config, params = checkpoint.load(path, dtype=dtype, allow_non_finite=allow_non_finite)  # dtype: a name or None
    return config, params, "the shipped demo model (trained on multi-term addition)" if is_demo_model(path) else path


def model_setting(path: str, description: str) -> str:
    """How a run's settings (eval's run.json, generate's run hash) name the model: the demo model by its description, others by absolute path."""
    from .demo import is_demo_model

    return description if is_demo_model(path) else os.path.abspath(path)


DTYPES = ("float32", "bfloat16")  # what --dtype (weights as stored) and --compute-dtype offer
QUANTIZATIONS = ("int8", "int4")  # what --quantize offers (zaya_jax.quant.SCHEMES)


class DeprecatedAlias(argparse.Action):
    """A former spelling of an option: stores its value as the current spelling does, with a one-line
    note on stderr. Hidden from --help."""

    def __init__(self, option_strings, dest, use: str, **kwargs):
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)
        self.use = use

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; {self.use}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser, option: str, use: str, *, dest: str, **kwargs) -> None:
    """Keeps ``option`` working as a hidden alias of ``dest``; ``use`` says what to write instead. The
    alias has no default of its own (the current spelling's stands) unless ``kwargs`` gives one."""
    kwargs.setdefault("default", argparse.SUPPRESS)
    parser.add_argument(option, dest=dest, action=DeprecatedAlias, use=use, **kwargs)


def add_model_arg(parser: argparse.ArgumentParser, default: str | None, *, former_option: bool = False) -> None:
    """MODEL, the positional argument of every command that runs a model; ``former_option`` keeps the
    ``--model`` spelling of the commands that took it as an option."""
    kwargs = dict(nargs="?", metavar="MODEL", help="model directory (HF checkpoint or `zaya convert` output); "
                                                   "default: the shipped demo model")
    if not former_option:
        parser.add_argument("model", default=default, **kwargs)
        return
    # Absent, the positional sets nothing: the default lives on --model, which it would otherwise overwrite.
    parser.add_argument("model", default=argparse.SUPPRESS, **kwargs)
    add_deprecated_alias(parser, "--model", "give the model directory as the positional MODEL", dest="model",
                         default=default)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL, --compute-dtype and --allow-non-finite of the commands that run a model to infer."""
    from .demo import DEFAULT_MODEL_DIR

    add_model_arg(parser, DEFAULT_MODEL_DIR)
    parser.add_argument("--compute-dtype", choices=DTYPES, default=None,
                        help="dtype the forward runs in: the weights are cast to it as they load (default: as stored)")
    add_deprecated_alias(parser, "--dtype", "use --compute-dtype (--dtype is the stored dtype: convert, train, rl)",
                         dest="compute_dtype", choices=DTYPES)
    add_non_finite_arg(parser)


def add_non_finite_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="use a model even if a weight holds NaN or Inf (refused by default)")


def seed_arg(text: str) -> int:
    """argparse type of ``--seed``: an integer ``jax.random.key`` takes (signed 64-bit)."""
    from .infer.sampling import SEED_MAX, SEED_MIN

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not SEED_MIN <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a signed 64-bit integer, got {text}")
    return value


def bounded_arg(low, high=None, kind=int, *, above: bool = False):
    """An argparse type: a ``kind`` number >= ``low`` (> ``low`` when ``above``) and <= ``high``, finite."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        too_low = value <= low if above else value < low
        if too_low or (high is not None and value > high) or not math.isfinite(value):
            bound = ("finite and " if kind is float else "") + (f"> {low}" if above else f">= {low}")
            raise argparse.ArgumentTypeError(f"must be {bound}" + (f" and <= {high}" if high is not None else "")
                                             + f", got {text}")
        return value

    return parse


def parse_ids(text: str) -> list[int]:
    """``--prompt-ids``: comma-separated integers; an empty item (``2,,3``) is refused, not skipped."""
    items = text.replace(" ", "").split(",")
    if not any(items):
        raise ValueError("--prompt-ids is empty")
    if "" in items:
        raise ValueError(f"--prompt-ids must be comma-separated integers: item {items.index('') + 1} is empty")
    try:
        return [int(t) for t in items]
    except ValueError as e:
        raise ValueError(f"--prompt-ids must be comma-separated integers: {e}") from None


def _forward_command(args) -> int:
    import numpy as np

    from .model import forward

    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    ids = parse_ids(args.prompt_ids)
    logits = np.asarray(forward(params, config, np.array([ids])))[0, -1]  # forward validates the ids
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
    p.add_argument("--top", type=bounded_arg(1), default=5, help="how many next-token candidates to print")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_forward_command)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zaya", description="ZAYA1 in JAX: run, convert, generate, search, train.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs a ``zaya`` command. Exit codes (docs/errors.md): 0 success; 2 bad input or usage, as argparse
    uses: any ValueError (ConfigError, CheckpointError, DataError, InputError, TokenizerError, ...), a
    missing input, an output that exists without --force; 1 a failure of the system while running (any
    other OSError: permission denied, disk full). Both print one ``error:`` line, no traceback. 130: Ctrl-C
    (see ``interrupted``)."""
    own = threading.current_thread() is threading.main_thread()  # signal handlers belong to the main thread
    previous = signal.signal(signal.SIGINT, interrupted) if own else None
    try:
        args = build_parser().parse_args(argv)
        return args.func(args) or 0
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if own:
            signal.signal(signal.SIGINT, previous)


def interrupted(signum=None, frame=None) -> None:
    """The SIGINT (Ctrl-C) handler of a command: ends the process at once, status 130, one ``error:`` line.
    A KeyboardInterrupt could be raised anywhere instead: inside XLA's garbage-collection callback, which
    swallows it (the run goes on), or with XLA's compiler and orbax's writer threads still running, under
    which the interpreter's teardown crashes (SIGSEGV). What a command writes is whole at every step
    (records and checkpoints are flushed or renamed into place as they finish), so ``--resume`` continues."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os.write(2, b"error: interrupted\n")
    os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
