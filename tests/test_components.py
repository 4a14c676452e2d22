"""Component parity: each ZAYA piece against the matching transformers module, same random weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.zaya import modeling_zaya

import hf_ref
import zaya_jax
from zaya_jax import model as zm


@pytest.fixture(scope="module", params=["tiny", "heads_conv"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = hf_ref.build(request.param, path, seed=3, skip_bias=0.05)
    config, params = zaya_jax.load(path)
    return hf, config, params


def _layer(params, layer):
    return jax.tree_util.tree_map(lambda a: a[layer], params["layers"])


def _t(x):
    return torch.as_tensor(np.asarray(x))


def _hidden(config, B=2, S=9, seed=0):
    return np.random.default_rng(seed).standard_normal((B, S, config.hidden_size)).astype(np.float32)


@pytest.mark.parametrize("layer", [0, 1])
def test_router(pair, layer):
    hf, config, params = pair
    x = _hidden(config)
    R = config.router_hidden_size
    # Layer 0 has no EDA term: it gets a zero incoming state (ours: scale of ones, exact).
    prev = np.zeros(x.shape[:2] + (R,), np.float32) if layer == 0 else \
        np.random.default_rng(1).standard_normal(x.shape[:2] + (R,)).astype(np.float32)
    gate_module = hf.model.layers[layer].mlp.gate
    router_states = _t(prev) if layer else None
    with torch.no_grad():
        # Move the skip-route bias so that about half of the tokens take it: both branches get checked.
        logits = gate_module(_t(x), router_states=router_states)[0]
        biased = torch.softmax(logits, -1) + gate_module.balancing_biases
        margin = biased[:, :-1].max(-1).values - biased[:, -1]
        biases = gate_module.balancing_biases.clone()
        biases[-1] += margin.median() + 1e-4
        gate_module.balancing_biases.copy_(biases)
        _, hf_gate, hf_idx, hf_next = gate_module(_t(x), router_states=router_states)
    p = dict(_layer(params, layer)["router"], balancing_biases=jnp.asarray(biases.numpy()))
    route, gate, nxt = zm.Router(config).apply({"params": p}, jnp.asarray(x), jnp.asarray(prev))
    route, gate = np.asarray(route).reshape(-1), np.asarray(gate).reshape(-1)
    skip = route == config.num_experts
    np.testing.assert_allclose(np.asarray(nxt), hf_next.numpy(), atol=1e-5)
    # transformers rewrites a skip choice to expert 0 with weight 0.
    np.testing.assert_array_equal(np.where(skip, 0, route), hf_idx.numpy().reshape(-1))
    np.testing.assert_allclose(np.where(skip, 0.0, gate), hf_gate.numpy().reshape(-1), atol=1e-6)
    assert skip.any() and (~skip).any(), "test data should take both real experts and the skip route"


def test_router_biases_steer_choice_not_gate(pair):
    _, config, params = pair
    x = jnp.asarray(_hidden(config))
    prev = jnp.zeros(x.shape[:2] + (config.router_hidden_size,))
    p = _layer(params, 1)["router"]
    route0, gate0, _ = zm.Router(config).apply({"params": p}, x, prev)
    forced = dict(p, balancing_biases=jnp.zeros(config.num_router_classes).at[2].set(10.0))
    route1, gate1, _ = zm.Router(config).apply({"params": forced}, x, prev)
    assert (np.asarray(route1) == 2).all()
    # The gate is the unbiased probability of the chosen route, not the biased score.
    assert (np.asarray(gate1) < 1.0).all()
    same = np.asarray(route0) == 2
    np.testing.assert_allclose(np.asarray(gate1)[same], np.asarray(gate0)[same], atol=1e-7)


@pytest.mark.parametrize("layer", [0, 1])
def test_cca_projection_left_padded(pair, layer):
    hf, config, params = pair
    x = _hidden(config)
    mask = np.ones(x.shape[:2], np.int64)
    mask[1, :4] = 0  # left padding on row 1
    with torch.no_grad():
        q, k, v = hf.model.layers[layer].self_attn.qkv_proj(_t(x), None, conv_mask=_t(mask))
    out = zm.CCAProjection(config, jnp.float32).apply(
        {"params": _layer(params, layer)["attn"]["cca"]}, jnp.asarray(x), jnp.asarray(mask, bool))
    for got, want in zip(out[:3], (q, k, v)):
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-5)


def test_cca_projection_state_continuation(pair):
    """Projecting a sequence in two chunks, carrying conv and value state, equals one pass; with right
    padding, each row's state is the one after its own last valid token."""
    _, config, params = pair
    x = jnp.asarray(_hidden(config, S=10))
    B = x.shape[0]
    valid = jnp.ones(x.shape[:2], bool)
    proj = zm.CCAProjection(config, jnp.float32)
    p = {"params": _layer(params, 1)["attn"]["cca"]}
    zeros = (jnp.zeros((B, config.conv_state_len, config.conv_channels)), jnp.zeros((B, config.kv_dim // 2)))
    full = proj.apply(p, x, valid, *zeros)
    assert proj.apply(p, x, valid)[3] is None  # no state asked, none computed (the uncached forward)
    first = proj.apply(p, x[:, :6], valid[:, :6], *zeros)
    second = proj.apply(p, x[:, 6:], valid[:, 6:], first[3], first[4])
    for a, b1, b2 in zip(full[:3], first[:3], second[:3]):
        np.testing.assert_allclose(np.asarray(a), np.concatenate([b1, b2], axis=1), atol=1e-5)
    np.testing.assert_allclose(full[3], second[3], atol=1e-6)
    np.testing.assert_allclose(full[4], second[4], atol=1e-6)
    # Row 0 holds 6 valid tokens then padding: its state is the one after token 6.
    ragged = proj.apply(p, x, valid.at[0, 6:].set(False), *zeros)
    np.testing.assert_allclose(ragged[3][0], first[3][0], atol=1e-6)
    np.testing.assert_allclose(ragged[4][0], first[4][0], atol=1e-6)


def test_qk_norm_and_rope(pair):
    hf, config, params = pair
    B, S, Dh = 2, 9, config.head_dim
    rng = np.random.default_rng(4)
    q = rng.standard_normal((B, S, config.num_attention_heads, Dh)).astype(np.float32)
    k = rng.standard_normal((B, S, config.num_key_value_heads, Dh)).astype(np.float32)
    positions = np.stack([np.arange(S), np.maximum(np.arange(S) - 3, 0)])
    attn = hf.model.layers[1].self_attn
    with torch.no_grad():
        hq, hk = attn.qk_norm(_t(q), _t(k))
        cos, sin = hf.model.rotary_emb(_t(q), _t(positions), "hybrid")
        hq, hk = modeling_zaya.apply_rotary_pos_emb(hq.transpose(1, 2), hk.transpose(1, 2), cos, sin)
    temp = _layer(params, 1)["attn"]["temp"]
    jq, jk = zm.qk_norm(jnp.asarray(q), jnp.asarray(k), temp, Dh)
    theta = jnp.float32(config.rope_theta_for("hybrid"))
    jq = zm.rope(jq, jnp.asarray(positions), theta, config.rotary_dim)
    jk = zm.rope(jk, jnp.asarray(positions), theta, config.rotary_dim)
    np.testing.assert_allclose(np.asarray(jq), hq.transpose(1, 2).numpy(), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jk), hk.transpose(1, 2).numpy(), atol=1e-5)


def test_residual_scaling(pair):
    hf, config, params = pair
    h, r = _hidden(config, seed=5), _hidden(config, seed=6)
    for name, ours in (("post_attention_residual_scale", "post_attn_scale"), ("post_mlp_residual_scale", "post_mlp_scale")):
        with torch.no_grad():
            want = getattr(hf.model.layers[1], name)(_t(h), _t(r)).numpy()
        got = zm.ResidualScale().apply({"params": _layer(params, 1)[ours]}, jnp.asarray(h), jnp.asarray(r))
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_init_distributions():
    """zaya_jax.init follows the reference initialisation."""
    config = zaya_jax.ZayaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4,
                                 router_hidden_size=32, pad_token_id=0)
    p = zaya_jax.init(config, jax.random.key(0))
    assert abs(float(jnp.std(p["layers"]["experts"]["gate_up"])) - config.initializer_range) < 2e-3
    assert abs(float(jnp.std(p["embed"][1:])) - config.initializer_range) < 2e-3
    assert float(jnp.abs(p["embed"][0]).max()) == 0.0  # padding row
    np.testing.assert_array_equal(p["layers"]["attn"]["temp"], 0.0)
    np.testing.assert_array_equal(p["layers"]["post_mlp_scale"]["hidden_scale"], 1.0)
    np.testing.assert_array_equal(p["layers"]["router"]["state_scale"], 1.0)
    np.testing.assert_array_equal(p["layers"]["router"]["balancing_biases"][:, -1], -1.0)
    np.testing.assert_array_equal(p["layers"]["router"]["balancing_biases"][:, :-1], 0.0)
    np.testing.assert_array_equal(p["layers"]["attn"]["cca"]["conv_grouped_bias"], 0.0)
    bf = zaya_jax.init(config, jax.random.key(0), jnp.bfloat16)
    assert bf["layers"]["experts"]["down"].dtype == jnp.bfloat16
    assert bf["layers"]["router"]["balancing_biases"].dtype == jnp.float32
