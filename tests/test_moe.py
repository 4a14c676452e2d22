"""Every MoE dispatch path against the loop-over-experts oracle, and the oracle against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from zaya_jax import moe, narrow

E, D, F = 5, 24, 16
IMPLS = ("gather", "loop", "grouped", "tiled", "sorted", "dense", "auto")


def _weights(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return jax.random.normal(k1, (E, D, 2 * F)) / np.sqrt(D), jax.random.normal(k2, (E, F, D)) / np.sqrt(F)


def _routes(kind, T, seed=1):
    rng = np.random.default_rng(seed)
    if kind == "random":  # includes skip-route tokens (idx == E)
        return rng.integers(0, E + 1, T)
    if kind == "one_expert":
        return np.full(T, 3)
    if kind == "all_skip":
        return np.full(T, E)
    if kind == "empty_experts":  # experts 0, 2, 4 get nothing
        return rng.choice([1, 3, E], T)
    raise ValueError(kind)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", ["random", "one_expert", "all_skip", "empty_experts"])
@pytest.mark.parametrize("T", [1, 7, 200])
@pytest.mark.parametrize("skip", ["zero", "scaled_identity"])
def test_paths_match_oracle(impl, kind, T, skip):
    gate_up, down = _weights()
    x = jax.random.normal(jax.random.key(2), (T, D))
    idx = jnp.asarray(_routes(kind, T), jnp.int32)
    gate = jax.random.uniform(jax.random.key(3), (T,))
    skip_scale = jnp.where(idx == E, gate, 0.0) if skip == "scaled_identity" else jnp.zeros(T)
    want = moe.experts_oracle(x, idx, gate, skip_scale, gate_up, down)
    got = jax.jit(lambda *a: moe.experts(*a, impl=impl))(x, idx, gate, skip_scale, gate_up, down)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    if kind == "all_skip":
        np.testing.assert_allclose(got, skip_scale[:, None] * x, atol=1e-6)


@pytest.mark.parametrize("impl", ["gather", "loop", "grouped", "tiled", "sorted", "dense"])
def test_gradients_match_oracle(impl):
    gate_up, down = _weights()
    T = 40
    x = jax.random.normal(jax.random.key(2), (T, D))
    idx = jnp.asarray(_routes("random", T), jnp.int32)
    gate = jax.random.uniform(jax.random.key(3), (T,))
    skip_scale = jnp.zeros(T)

    def loss(fn, x, gate, gate_up, down):
        return jnp.sum(jnp.sin(fn(x, idx, gate, skip_scale, gate_up, down)))

    want = jax.grad(lambda *a: loss(moe.experts_oracle, *a), argnums=(0, 1, 2, 3))(x, gate, gate_up, down)
    fn = lambda *a: moe.experts(*a, impl=impl)  # noqa: E731
    got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3)))(x, gate, gate_up, down)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_tiled_explicit_tile_sizes():
    gate_up, down = _weights()
    T = 100
    x = jax.random.normal(jax.random.key(2), (T, D))
    idx = jnp.asarray(_routes("random", T), jnp.int32)
    gate, skip_scale = jnp.ones(T), jnp.zeros(T)
    want = moe.experts_oracle(x, idx, gate, skip_scale, gate_up, down)
    for tile in (1, 3, 16, 64, 1000):
        got = moe.experts_tiled(x, idx, gate, skip_scale, gate_up, down, tile=tile)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=f"tile={tile}")


def test_capacity_buckets_hold_any_group():
    assert moe.capacity_buckets(1) == (0, 1)
    assert moe.capacity_buckets(16) == (0, 1, 2, 4, 6, 8, 12, 16)
    assert moe.capacity_buckets(17)[-1] == 24
    for tokens in range(1, 300):  # every group size fits a bucket padded at most 1.5x (above 2 rows)
        buckets = moe.capacity_buckets(tokens)
        assert buckets[-1] >= tokens and buckets[-2] < tokens
        assert all(next(b for b in buckets if b >= n) <= max(1.5 * n, 2) for n in range(1, tokens + 1))


def test_stacked_layer_weights():
    """With ``layer``, every path reads the same experts out of a [L, E, ...] stack."""
    stack = [_weights(seed) for seed in range(3)]
    gate_up, down = jnp.stack([g for g, _ in stack]), jnp.stack([d for _, d in stack])
    T = 9
    x = jax.random.normal(jax.random.key(2), (T, D))
    idx = jnp.asarray(_routes("random", T), jnp.int32)
    gate, skip_scale = jnp.ones(T), jnp.zeros(T)
    want = moe.experts_oracle(x, idx, gate, skip_scale, *stack[1])
    for impl in ("loop", "gather", "tiled", "sorted", "dense"):
        run = jax.jit(lambda layer, impl=impl: moe.experts(x, idx, gate, skip_scale, gate_up, down, impl, layer=layer))
        np.testing.assert_allclose(run(jnp.int32(1)), want, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_sorted_gradients_through_the_layer_stack():
    """``sorted``'s custom backward with ``layer``: the gradients of x and of the [L, E, ...] stack equal the
    oracle's on that layer's experts, and the other layers' slots stay zero."""
    stack = [_weights(seed) for seed in range(3)]
    gate_up, down = jnp.stack([g for g, _ in stack]), jnp.stack([d for _, d in stack])
    T = 30
    x = jax.random.normal(jax.random.key(2), (T, D))
    idx = jnp.asarray(_routes("empty_experts", T), jnp.int32)
    gate, skip_scale = jax.random.uniform(jax.random.key(3), (T,)), jnp.zeros(T)

    def loss(x, gate_up, down, layer=None):
        return jnp.sum(jnp.sin(moe.experts(x, idx, gate, skip_scale, gate_up, down, "sorted", layer=layer)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gate_up, down, jnp.int32(1))
    want = jax.grad(lambda x, gu, dn: jnp.sum(jnp.sin(moe.experts_oracle(x, idx, gate, skip_scale, gu, dn))),
                    argnums=(0, 1, 2))(x, *stack[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_allclose(g[1], w, atol=1e-5, rtol=1e-5)
        assert not np.any(g[0]) and not np.any(g[2])


def test_loop_reads_bfloat16_experts_in_row_blocks(monkeypatch):
    """bfloat16 weights on CPU: ``loop`` reads each expert of the layer stack in row blocks (12 and 8 blocks
    here), accumulating in float32; it equals the float32 oracle on the same weights within bfloat16's
    rounding of the hidden activation and the output."""
    monkeypatch.setattr(narrow, "CONVERT_BLOCK_BYTES", 2 * 2 * F * 4)  # 2 rows of gate_up, 2 of down
    assert narrow.row_block(D, 2 * F) == 2 and narrow.row_block(F, D) == 2
    stack = [_weights(seed) for seed in range(2)]
    gate_up = jnp.stack([g for g, _ in stack]).astype(jnp.bfloat16)
    down = jnp.stack([d for _, d in stack]).astype(jnp.bfloat16)
    T = 9
    x = jax.random.normal(jax.random.key(2), (T, D)).astype(jnp.bfloat16)
    idx = jnp.asarray(_routes("random", T), jnp.int32)
    gate, skip_scale = jax.random.uniform(jax.random.key(3), (T,)), jnp.zeros(T)
    got = jax.jit(lambda layer: moe.experts(x, idx, gate, skip_scale, gate_up, down, "loop", layer=layer))(jnp.int32(1))
    assert got.dtype == jnp.bfloat16
    want = moe.experts_oracle(x.astype(jnp.float32), idx, gate, skip_scale, gate_up[1].astype(jnp.float32),
                              down[1].astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=3e-2, rtol=3e-2)


def test_auto_choice():
    assert moe.auto_impl(1, "cpu") == "loop"
    assert moe.auto_impl(4, "cpu") == "loop"
    assert moe.auto_impl(5, "cpu") == "sorted"
    assert moe.auto_impl(8192, "cpu") == "sorted"
    assert moe.auto_impl(16, "cpu", training=True) == "loop"
    assert moe.auto_impl(17, "cpu", training=True) == "sorted"
    assert moe.auto_impl(4, "gpu", training=True) == "gather"
    assert moe.auto_impl(4, "gpu") == "gather"
    assert moe.auto_impl(512, "gpu") == "grouped"
    # TPU decode: dense where it reads fewer weight bytes than grouped's copy + read of the touched experts.
    assert moe.auto_impl(64, "tpu", num_experts=2) == "dense"
    assert moe.auto_impl(1, "tpu", num_experts=2) == "dense"  # 2 <= 3 x 1 touched
    assert moe.auto_impl(1, "tpu", num_experts=16) == "gather"  # all 16 read for 1 touched: no
    assert moe.auto_impl(8, "tpu", num_experts=16) == "dense"  # 6.4 touched, x 3 > 16
    assert moe.auto_impl(256, "tpu", num_experts=16) == "dense"
    assert moe.auto_impl(257, "tpu", num_experts=16) == "grouped"  # toward GROUPED_READS x the ridge point
    assert moe.auto_impl(64, "tpu", training=True, num_experts=2) == "grouped"
    assert moe.auto_impl(64, "tpu") == "grouped"  # expert count unknown
    assert moe.auto_impl(64, "gpu", num_experts=2) == "grouped"
    with pytest.raises(ValueError, match="unknown MoE implementation"):
        moe.experts(jnp.zeros((1, D)), jnp.zeros(1, jnp.int32), jnp.ones(1), jnp.zeros(1), *_weights(), impl="nope")


def test_oracle_matches_transformers_experts():
    """Gate columns first, [E, D, 2F] / [E, F, D] layout, zero output on the skip route."""
    config = transformers.ZayaConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E)
    ref = transformers.models.zaya.modeling_zaya.ZayaExperts(config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref.gate_up_proj.copy_(torch.randn(ref.gate_up_proj.shape, generator=g) / np.sqrt(D))
        ref.down_proj.copy_(torch.randn(ref.down_proj.shape, generator=g) / np.sqrt(F))
    T = 30
    x = np.random.default_rng(0).standard_normal((T, D)).astype(np.float32)
    idx = _routes("random", T)
    gate = np.random.default_rng(1).uniform(size=T).astype(np.float32)
    # transformers' router rewrites a skip choice to expert 0 with weight 0.
    hf_idx = np.where(idx == E, 0, idx)
    hf_gate = np.where(idx == E, 0.0, gate).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.as_tensor(x), torch.as_tensor(hf_idx)[:, None], torch.as_tensor(hf_gate)[:, None]).numpy()
    gate_up = jnp.asarray(ref.gate_up_proj.detach().numpy().transpose(0, 2, 1))
    down = jnp.asarray(ref.down_proj.detach().numpy().transpose(0, 2, 1))
    got = moe.experts_oracle(jnp.asarray(x), jnp.asarray(idx, jnp.int32), jnp.asarray(gate), jnp.zeros(T), gate_up, down)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
