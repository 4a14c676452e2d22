"""`zaya train` end to end: a run killed with SIGKILL (while writing a checkpoint) and resumed gives the
same loss at every later step as an uninterrupted run; the trained model loads and exports."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import torch
import transformers

import hf_ref
import zaya_jax
from zaya_jax import cli
from zaya_jax.convert import export

STEPS, SAVE_EVERY = 12, 2
TMP_SUFFIX = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    hf_ref.build("tiny", root / "model", seed=0)
    rng = np.random.default_rng(0)
    with open(root / "data.jsonl", "w") as f:
        for _ in range(24):
            ids = rng.integers(1, hf_ref.TINY["vocab_size"], int(rng.integers(6, 40))).tolist()
            f.write(json.dumps({"input_ids": ids}) + "\n")
    # The three runs share one compilation cache: identical programs, compiled once.
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(root / "jax-cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return root, env


def args(root, out, *extra):
    return ["train", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(out),
            "--steps", str(STEPS), "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
            "--save-every", str(SAVE_EVERY), "--keep", "2", "--bias-rate", "1e-2", "--no-progress", *extra]


def zaya(argv, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "zaya_jax.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def losses(out):
    with open(out / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def kill_while_saving(proc, ckpt_dir, min_step):
    """SIGKILLs ``proc`` while it writes a checkpoint after step ``min_step``; returns the steps complete then."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        names = os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []
        writing = [n for n in names if n.endswith(TMP_SUFFIX) and int(n.split(".")[0]) > min_step]
        if writing:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return sorted(int(n) for n in names if n.isdigit())
        time.sleep(0.001)
    raise AssertionError(f"the run ended (rc {proc.poll()}) before it could be killed mid-save:\n{proc.stdout.read()}")


def test_sigkill_and_resume_match_an_uninterrupted_run(setup):
    root, env = setup
    full = zaya(args(root, root / "full"), env)
    assert full.wait() == 0, full.stdout.read()
    reference = losses(root / "full")
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert reference[STEPS] < reference[1]

    victim = zaya(args(root, root / "killed"), env)
    complete = kill_while_saving(victim, root / "killed" / "checkpoints", min_step=4)
    left = os.listdir(root / "killed" / "checkpoints")
    assert any(n.endswith(TMP_SUFFIX) for n in left), "the kill did not interrupt a save"
    assert complete and max(complete) >= 4

    resumed = zaya(args(root, root / "killed", "--resume", "--json"), env)
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    # The half-written step was not picked up: the run restarted from the last complete one, and cleaned up.
    assert not any(n.endswith(TMP_SUFFIX) for n in os.listdir(root / "killed" / "checkpoints"))
    again = losses(root / "killed")
    assert sorted(again) == list(range(1, STEPS + 1))
    for step in range(max(complete) + 1, STEPS + 1):
        assert again[step] == reference[step], f"step {step}: {again[step]} != {reference[step]}"
    assert json.loads(output.strip().splitlines()[-1])["steps"] == STEPS

    # Exact resume gives the same final model, which loads and exports to a transformers checkpoint.
    config, trained = zaya_jax.load(root / "killed" / "model")
    _, uninterrupted = zaya_jax.load(root / "full" / "model")
    for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(uninterrupted)):
        np.testing.assert_array_equal(a, b)
    export(str(root / "killed" / "model"), str(root / "hf"), progress=False)
    model = transformers.ZayaForCausalLM.from_pretrained(root / "hf", attn_implementation="eager").eval()
    # transformers' from_pretrained re-initialises the balancing-bias buffers: put the trained ones back.
    biases = np.asarray(trained["layers"]["router"]["balancing_biases"])
    with torch.no_grad():
        for layer, bias in zip(model.model.layers, biases):
            layer.mlp.gate.balancing_biases.copy_(torch.tensor(bias))
    ids = np.random.default_rng(1).integers(1, config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(zaya_jax.forward(trained, config, ids)), ref, atol=1e-4, rtol=0)


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_checkpoints(setup, capsys):
    root, _ = setup
    out = root / "killed"
    if not (out / "run.json").exists():
        pytest.skip("needs the run of the previous test")
    assert cli.main(args(root, out, "--resume", "--lr", "1e-3")) == 2
    assert "settings differ from the saved run in train" in capsys.readouterr().err
    assert cli.main(args(root, out)) == 2
    assert "already holds checkpoints, model, metrics.jsonl, run.json; pass --resume" in capsys.readouterr().err
    assert cli.main(args(root, root / "nothing", "--resume")) == 2
    assert "cannot resume" in capsys.readouterr().err


def test_resume_refuses_a_changed_data_file(setup, capsys):
    root, _ = setup
    out = root / "killed"
    if not (out / "run.json").exists():
        pytest.skip("needs the run of the first test")
    data = root / "data.jsonl"
    original = data.read_text()
    try:
        data.write_text(original + json.dumps({"input_ids": [5, 6, 7]}) + "\n")
        assert cli.main(args(root, out, "--resume")) == 2
        assert f"the data file {data} changed since the run started" in capsys.readouterr().err
    finally:
        data.write_text(original)
