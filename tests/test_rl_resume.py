"""`zaya rl` end to end: a run SIGKILLed after a few steps and resumed gives the same metrics and the same
final model, bit for bit, as an uninterrupted run (rollout keys and problem order are functions of the
seed and the step); a fresh run refuses an existing --out."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import zaya_jax
from helpers import write_rl_problem_set
from zaya_jax import cli

STEPS = 4
TIMING = ("rollout_tokens_per_s", "train_tokens_per_s", "rollout_s", "train_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    write_rl_problem_set(root, 5)
    tests = str(pathlib.Path(__file__).parent)
    # The runs share one compilation cache: identical programs, compiled once.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    return root, env


def args(root, out, *extra):
    return ["rl", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(out),
            "--steps", str(STEPS), "--prompts", "2", "--group", "3", "--max-new-tokens", "6", "--minibatches", "2",
            "--lr", "1e-2", "--kl-coef", "0.1", "--verifier", "helpers:digit_reward", "--save-every", "1",
            "--slots", "8", "--no-progress", *extra]


def zaya(argv, env):
    return subprocess.Popen([sys.executable, "-m", "zaya_jax.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def test_sigkill_and_resume_match_an_uninterrupted_run(setup):
    root, env = setup
    full = zaya(args(root, root / "full"), env)
    assert full.wait() == 0, full.stdout.read()
    reference = metrics(root / "full")
    assert [m["step"] for m in reference] == list(range(1, STEPS + 1))
    assert any(m["advantage_abs"] > 0 for m in reference)  # the updates were not all zero

    victim = zaya(args(root, root / "killed"), env)
    deadline = time.time() + 300
    ckpt = root / "killed" / "checkpoints"
    while victim.poll() is None and time.time() < deadline:
        if ckpt.is_dir() and any(n.isdigit() and int(n) >= 2 for n in os.listdir(ckpt)):
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert victim.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (root / "killed" / "model").exists()
    assert len(metrics(root / "killed")) < STEPS

    resumed = zaya(args(root, root / "killed", "--resume", "--json"), env)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert metrics(root / "killed") == reference
    _, trained = zaya_jax.load(root / "killed" / "model")
    _, uninterrupted = zaya_jax.load(root / "full" / "model")
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)


def test_existing_out_is_refused_without_force(setup, capsys):
    root, _ = setup
    if not (root / "full" / "run.json").exists():
        pytest.skip("needs the run of the previous test")
    assert cli.main(args(root, root / "full")) == 2
    assert "already holds checkpoints, model, metrics.jsonl, run.json; pass --resume" in capsys.readouterr().err
    assert cli.main(args(root, root / "full", "--resume", "--group", "4")) == 2
    assert "settings differ from the saved run in rl" in capsys.readouterr().err
