"""The `zaya` command's conventions, checked on the parser alone (nothing loads or compiles): MODEL is
positional in every command that runs a model; former spellings still parse, with a one-line note on
stderr; train's and rl's defaults are their dataclasses' (so a run.json of an earlier run resumes)."""

import dataclasses

import pytest

from zaya_jax.cli import build_parser
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.train.cli import from_args
from zaya_jax.train.grpo import GRPOObjective
from zaya_jax.train.loop import RunConfig, changed_settings, setting_defaults
from zaya_jax.train.rl_cli import RL_OPTIMIZER
from zaya_jax.train.rl_loop import RLConfig
from zaya_jax.train.step import TrainConfig

# Each command that runs a model, with the options it requires.
REQUIRED = {
    "forward": [], "generate": ["--prompt-ids", "1"], "rsa": ["--prompt-ids", "1"],
    "eval": ["--data", "d.jsonl", "--out", "o"], "serve": [], "demo": [],
    "train": ["--data", "d.jsonl", "--out", "o"], "rl": ["--data", "d.jsonl", "--out", "o"],
}
FORMER_MODEL_OPTION = ("train", "rl", "demo")


def parse(capsys, *argv):
    args = build_parser().parse_args(list(argv))
    return args, capsys.readouterr().err


def help_text(capsys, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "200")  # no wrapping
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_model_is_positional(capsys, command):
    for argv in ([command, "some/model", *REQUIRED[command]], [command, *REQUIRED[command], "some/model"]):
        args, err = parse(capsys, *argv)
        assert args.model == "some/model" and err == ""


@pytest.mark.parametrize("command", sorted(REQUIRED))
def test_model_defaults_to_the_demo_model(capsys, command):
    args, _ = parse(capsys, command, *REQUIRED[command])
    # train and rl record the model in run.json: None (the demo model) as before, so such runs still resume.
    assert args.model == (None if command in ("train", "rl") else DEFAULT_MODEL_DIR)


@pytest.mark.parametrize("command", FORMER_MODEL_OPTION)
def test_former_model_option_parses_with_a_note(capsys, monkeypatch, command):
    for argv in ([command, "--model", "some/model", *REQUIRED[command]],
                 [command, *REQUIRED[command], "--model", "some/model"]):
        args, err = parse(capsys, *argv)
        assert args.model == "some/model"
        assert err.count("\n") == 1 and "--model is deprecated" in err and "positional MODEL" in err
    assert "--model" not in help_text(capsys, monkeypatch, command)


def test_grad_clip_is_one_option(capsys):
    for command in ("train", "rl"):
        args, err = parse(capsys, command, *REQUIRED[command], "--grad-clip", "0.5")
        assert args.clip_norm == 0.5 and err == ""
    args, err = parse(capsys, "train", *REQUIRED["train"], "--clip", "0.5")
    assert args.clip_norm == 0.5 and err == "note: --clip is deprecated; use --grad-clip\n"


@pytest.mark.parametrize("command", ["forward", "generate", "rsa", "eval", "serve"])
def test_compute_dtype_and_the_former_dtype(capsys, command):
    args, err = parse(capsys, command, *REQUIRED[command], "--compute-dtype", "bfloat16")
    assert args.compute_dtype == "bfloat16" and err == ""
    args, err = parse(capsys, command, *REQUIRED[command], "--dtype", "bfloat16")
    assert args.compute_dtype == "bfloat16" and "--dtype is deprecated; use --compute-dtype" in err
    args, _ = parse(capsys, command, *REQUIRED[command])
    assert args.compute_dtype is None


def test_dtype_is_the_stored_dtype(capsys):
    """--dtype names the dtype weights are stored in (convert writes it, train and rl save in it);
    --compute-dtype the dtype the forward runs in."""
    for argv in (["convert", "src", "dst"], ["train", *REQUIRED["train"]], ["rl", *REQUIRED["rl"]]):
        args, err = parse(capsys, *argv, "--dtype", "bfloat16")
        assert args.dtype == "bfloat16" and err == ""
    args, _ = parse(capsys, "train", *REQUIRED["train"], "--compute-dtype", "bfloat16")
    assert (args.dtype, args.compute_dtype) == (None, "bfloat16")


def test_train_defaults_are_the_dataclasses(capsys):
    args, _ = parse(capsys, "train", *REQUIRED["train"])
    assert args.steps == TrainConfig.total_steps and args.warmup_steps is None  # min(100, steps/10): 100 here
    assert from_args(TrainConfig, args, warmup_steps=TrainConfig.warmup_steps) == TrainConfig()
    assert from_args(RunConfig, args) == RunConfig(steps=args.steps, batch_size=args.batch_size,
                                                   seq_len=args.seq_len)


def test_rl_defaults_are_the_dataclasses(capsys):
    args, _ = parse(capsys, "rl", *REQUIRED["rl"])
    assert from_args(RLConfig, args) == RLConfig(steps=args.steps)
    assert from_args(GRPOObjective, args) == GRPOObjective()
    assert from_args(TrainConfig, args) == TrainConfig(**RL_OPTIMIZER)


def test_help_shows_the_dataclass_defaults(capsys, monkeypatch):
    train, rl = help_text(capsys, monkeypatch, "train"), help_text(capsys, monkeypatch, "rl")
    assert f"peak learning rate (default {TrainConfig.learning_rate})" in train
    assert f"peak learning rate (default {RL_OPTIMIZER['learning_rate']})" in rl
    assert f"ratio clip below 1 (default {GRPOObjective.clip_low})" in rl
    assert f"problems per step (default {RLConfig.prompts})" in rl


# The settings sections of run.json as `zaya train|rl --data D --out O` wrote them before MODEL was
# positional and the defaults were read from the dataclasses.
EARLIER_TRAIN = {
    "train": {"learning_rate": 1e-4, "warmup_steps": 100, "total_steps": 1000, "final_lr_ratio": 0.1,
              "weight_decay": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8, "clip_norm": 1.0, "grad_accum": 1,
              "remat_policy": "none", "compute_dtype": "float32", "bias_rate": 1e-3, "loss_chunk": None,
              "moe_impl": "auto"},
    "run": {"steps": 1000, "batch_size": 8, "seq_len": 512, "seed": 0},
}
EARLIER_RL = {
    "train": {**EARLIER_TRAIN["train"], "learning_rate": 1e-6, "warmup_steps": 0, "total_steps": 100,
              "final_lr_ratio": 1.0, "weight_decay": 0.0},
    "grpo": {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.0, "temperature": 1.0},
    "rl": {"steps": 100, "prompts": 8, "group": 8, "max_new_tokens": 256, "temperature": 1.0, "minibatches": 1,
           "epochs": 1, "replay": True, "task": "solve", "population": 16, "tails": 4, "tail_tokens": 24,
           "agg_prompts": 2, "agg_select": "first", "mix_solve": False, "skip_tied": False, "seed": 0},
}


def test_earlier_runs_settings_still_match(capsys):
    """What prepare_out compares on --resume (the run and rl sections leave out save_every, keep, slots)."""
    args, _ = parse(capsys, "train", *REQUIRED["train"])
    run = dataclasses.asdict(from_args(RunConfig, args))
    settings = {"train": dataclasses.asdict(from_args(TrainConfig, args, warmup_steps=100, total_steps=args.steps)),
                "run": {k: run[k] for k in EARLIER_TRAIN["run"]}}
    assert changed_settings(EARLIER_TRAIN, settings, setting_defaults(train=TrainConfig, run=RunConfig)) == []

    args, _ = parse(capsys, "rl", "--model", "m", *REQUIRED["rl"], "--no-replay")
    rcfg = from_args(RLConfig, args)
    settings = {"train": dataclasses.asdict(from_args(TrainConfig, args, total_steps=rcfg.steps * rcfg.updates)),
                "grpo": dataclasses.asdict(from_args(GRPOObjective, args)),
                "rl": {k: v for k, v in dataclasses.asdict(rcfg).items() if k not in ("save_every", "keep", "slots")}}
    earlier = {**EARLIER_RL, "rl": {**EARLIER_RL["rl"], "replay": False}}
    defaults = setting_defaults(train=TrainConfig, grpo=GRPOObjective, rl=RLConfig)
    assert changed_settings(earlier, settings, defaults) == []
