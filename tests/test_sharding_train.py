"""One train step under each test mesh gives the unsharded loss, gradients and updated params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import zaya_jax
from helpers import CONFIG, MESHES
from zaya_jax import sharding as shd
from zaya_jax.train import loss, step

# The tiled MoE (`auto` picked it for training above 16 tokens on CPU until `sorted` got its custom
# backward; `sorted` is checked below): its per-tile lax.cond once held the data/fsdp all-reduce of the expert-weight
# gradients, which devices with differently routed tokens did not all reach -- the step deadlocked.
MOE_IMPL = "tiled"
TCFG = step.TrainConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, moe_impl=MOE_IMPL)


def _batch():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, CONFIG.vocab_size, (4, 8)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[2, :3] = 0
    return {"tokens": tokens, "mask": mask, "loss_mask": mask.copy()}


def _grads(params, batch):
    return jax.jit(jax.grad(lambda p, b: loss.masked_ce_sum(p, CONFIG, b, moe_impl=MOE_IMPL)[0]))(params, batch)


@pytest.fixture(scope="module")
def reference():
    params = zaya_jax.init(CONFIG, jax.random.key(0))
    batch = _batch()
    grads = _grads(params, batch)
    # The step donates its state, which may share buffers with the params it was built from: use a copy.
    state, metrics = step.make_train_step(CONFIG, TCFG)(step.init_state(jax.tree.map(jnp.copy, params), TCFG), batch)
    return params, batch, grads, state, metrics


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_train_step_equals_unsharded(reference, name):
    params, batch, want_grads, want_state, want_metrics = reference
    sizes, rules = MESHES[name]
    mesh = shd.make_mesh(**sizes)
    param_sharding = shd.param_shardings(CONFIG, mesh, rules)
    replicated = NamedSharding(mesh, P())
    abstract = jax.eval_shape(lambda p: step.init_state(p, TCFG), params)
    state_sharding = step.state_shardings(abstract, param_sharding, replicated, TCFG)
    rows = shd.batch_sharding(mesh, rules=rules, batch=batch["tokens"].shape[0])
    sharded_batch = jax.device_put(batch, rows)
    sharded = jax.device_put(params, param_sharding)
    state = jax.device_put(step.init_state(jax.tree.map(jnp.copy, sharded), TCFG), state_sharding)
    with jax.set_mesh(mesh):
        grads = _grads(sharded, sharded_batch)
        train = step.make_train_step(CONFIG, TCFG, state_sharding=state_sharding, batch_sharding=rows,
                                     metrics_sharding=replicated)
        state, metrics = train(state, sharded_batch)
    np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(want_state.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
    assert state.params["layers"]["experts"]["gate_up"].sharding.spec == param_sharding["layers"]["experts"]["gate_up"].spec


@pytest.mark.parametrize("name", ["expert4_tensor2", "data2_expert4"])
def test_sorted_sharded_gradients_equal_unsharded(reference, name):
    """`sorted` (what `auto` picks for training above 16 tokens on CPU) under the meshes where its loops'
    trip counts differ between devices (data) or hold a collective (tensor): the gradients equal the
    unsharded tiled ones."""
    params, batch, want_grads, _, _ = reference
    sizes, rules = MESHES[name]
    mesh = shd.make_mesh(**sizes)
    sharded = jax.device_put(params, shd.param_shardings(CONFIG, mesh, rules))
    sharded_batch = jax.device_put(batch, shd.batch_sharding(mesh, rules=rules, batch=batch["tokens"].shape[0]))
    with jax.set_mesh(mesh):
        grads = jax.jit(jax.grad(lambda p, b: loss.masked_ce_sum(p, CONFIG, b, moe_impl="sorted")[0]))(sharded, sharded_batch)
    for got, want in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
