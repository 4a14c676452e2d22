"""The train step under a (data, fsdp, expert) mesh of 8 CPU devices equals the unsharded step."""

import json

import jax
import jax.numpy as jnp
import numpy as np

import hf_ref
import zaya_jax
from zaya_jax import cli, sharding
from zaya_jax.train import loop, step


def test_sharded_step_equals_unsharded():
    config = zaya_jax.ZayaConfig(**hf_ref.TINY)
    params = zaya_jax.init(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    batch = {"tokens": jnp.asarray(rng.integers(1, config.vocab_size, (8, 16)), jnp.int32),
             "mask": jnp.ones((8, 16), jnp.int32), "loss_mask": jnp.asarray(rng.random((8, 16)) > 0.2, jnp.int32)}
    tcfg = step.TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
    ref_state, ref = step.make_train_step(config, tcfg)(step.init_state(jax.tree.map(jnp.copy, params), tcfg), batch)

    mesh = sharding.make_mesh(data=2, fsdp=2, expert=2)
    state = step.init_state(jax.tree.map(jnp.copy, params), tcfg)
    shard = loop.Sharded(mesh, config, state, tcfg, batch_size=8)
    with jax.set_mesh(mesh):
        train_step = step.make_train_step(config, tcfg, state_sharding=shard.state, batch_sharding=shard.batch,
                                          metrics_sharding=shard.metrics)
        new_state, metrics = train_step(jax.device_put(state, shard.state), jax.device_put(batch, shard.batch))
    np.testing.assert_allclose(metrics["loss"], ref["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], ref["grad_norm"], rtol=1e-5)
    np.testing.assert_array_equal(metrics["route_counts"], ref["route_counts"])
    # Adam divides by |g|: where a gradient is ~0, summation-order noise of the sharded reductions moves a
    # weight by up to ~lr; 1% of lr bounds it (a wrong sharded computation moves weights by ~lr).
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-2 * tcfg.learning_rate)
    np.testing.assert_array_equal(new_state.biases, ref_state.biases)
    # Weights and their Adam moments are split over the expert and fsdp axes, not replicated.
    gate_up = new_state.params["layers"]["experts"]["gate_up"]
    mu = new_state.opt_state[1][0].mu["layers"]["experts"]["gate_up"]
    assert gate_up.sharding.spec == mu.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", None)
    assert gate_up.addressable_shards[0].data.shape[1:3] == (config.num_experts // 2, config.hidden_size // 2)


def test_bad_mesh_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"input_ids": [1, 2, 3]}\n')
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "out"), "--mesh", "data=3", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "has 3 devices but 8 are available" in capsys.readouterr().err


def test_cli_mesh_run_equals_one_device(tmp_path):
    """`zaya train --mesh` on right-padded batches of uneven rows completes and logs the one-device losses.

    (Its backward pass once deadlocked in XLA:CPU's all-reduce rendezvous: the data/fsdp reduction of the
    expert-weight gradients sat inside the tiled MoE's per-tile lax.cond, which not every device entered.)
    """
    hf_ref.build("tiny", tmp_path / "model", seed=0)
    rng = np.random.default_rng(0)
    with open(tmp_path / "d.jsonl", "w") as f:
        for _ in range(12):
            f.write(json.dumps({"input_ids": rng.integers(1, 256, int(rng.integers(6, 40))).tolist()}) + "\n")

    def run(name, *extra):
        argv = ["train", str(tmp_path / "model"), "--data", str(tmp_path / "d.jsonl"),
                "--out", str(tmp_path / name), "--steps", "3", "--batch-size", "4", "--seq-len", "32",
                "--lr", "3e-3", "--warmup", "1", "--no-progress", *extra]
        assert cli.main(argv) == 0
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    sharded = run("mesh", "--mesh", "data=2,fsdp=2,expert=2")
    assert len(sharded) == 3
    np.testing.assert_allclose(sharded, run("one"), rtol=1e-5)
