"""Two processes on localhost (``jax.distributed.initialize``, gloo CPU collectives), 4 virtual devices
each, one 8-device mesh across them: the sharded forward and greedy generation equal the
single-process ones."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

import zaya_jax
from zaya_jax import convert

CONFIG = zaya_jax.ZayaConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, moe_intermediate_size=24, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
    initializer_range=0.2,  # with an untied head: greedy outputs that are not just the last token repeated
)
NEW_TOKENS = 6
WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_two_processes(model_dir, inputs, out, *extra):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # the worker sets 4 CPU devices itself
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, WORKER, str(i), port, str(model_dir), str(inputs), str(out), *extra],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-3000:] if i < len(logs) else ''}"
    return np.load(out)


def test_two_process_forward_and_generation_equal_single_process(tmp_path):
    params = zaya_jax.init(CONFIG, jax.random.key(0))
    convert.save_hf(params, CONFIG, str(tmp_path / "model"))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, (4, 8))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    np.savez(tmp_path / "inputs.npz", ids=ids, mask=mask)

    got = _run_two_processes(tmp_path / "model", tmp_path / "inputs.npz", tmp_path / "out.npz", "data=2,expert=2,tensor=2",
                             str(NEW_TOKENS))

    want = np.asarray(zaya_jax.forward(params, CONFIG, ids, mask))
    real = mask.astype(bool)
    err = np.abs(got["logits"][real] - want[real]).max()
    print(f"two-process forward: max abs logit error {err:.2e}")
    assert err <= 1e-5

    from zaya_jax.infer import generate

    prompts = [list(map(int, row[m.astype(bool)])) for row, m in zip(ids, mask)]
    tokens = generate(params, CONFIG, prompts, max_new_tokens=NEW_TOKENS, stop_token_ids=[]).tokens
    assert len({t for row in tokens for t in row}) > len(prompts), f"degenerate reference generation {tokens}"
    assert got["tokens"].tolist() == tokens
