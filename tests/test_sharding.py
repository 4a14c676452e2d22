"""Sharding on 8 virtual CPU devices: mesh and rules validation, expert/tensor/data/fsdp-parallel
forward equal to the unsharded one, and a decode step that never all-gathers expert weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import zaya_jax
from helpers import CONFIG, MESHES
from zaya_jax import expert_parallel, moe
from zaya_jax import mesh as mesh_lib
from zaya_jax import sharding as shd


@pytest.fixture(scope="module")
def params():
    # scaled_identity off (native); a positive skip bias sends some tokens down the skip route.
    p = zaya_jax.init(CONFIG, jax.random.key(0))
    p["layers"]["router"]["balancing_biases"] = p["layers"]["router"]["balancing_biases"].at[:, -1].set(0.02)
    return p


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CONFIG.vocab_size, (4, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :6] = 0
    return ids, mask


# ------------------------------------------------------------------ mesh and rules


def test_make_mesh_axes_and_errors():
    mesh = shd.make_mesh(data=2, expert=2, tensor=2)
    assert mesh.axis_names == shd.AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    with pytest.raises(shd.ShardingError, match="has 4 devices but 8"):
        shd.make_mesh(expert=4)
    with pytest.raises(shd.ShardingError, match="'tensor' must be a positive integer"):
        shd.make_mesh(expert=8, tensor=0)
    assert shd.parse_mesh("data=2, expert=4") == {"data": 2, "expert": 4}
    for bad in ("data=2,data=4", "rows=2", "expert=x"):
        with pytest.raises(shd.ShardingError):
            shd.parse_mesh(bad)


def test_rule_mapping_one_mesh_axis_twice_is_an_error():
    with pytest.raises(shd.ShardingError, match="maps one mesh axis twice"):
        shd.Rules.of({"batch": ("data", "data")})
    with pytest.raises(shd.ShardingError, match="unknown mesh axis 'model'"):
        shd.Rules.of({"embed": "model"})
    rules = shd.INFERENCE.replace(embed="expert")  # experts and embed both on `expert`
    with pytest.raises(shd.ShardingError, match="mesh axis 'expert' used twice"):
        shd.param_specs(CONFIG, shd.make_mesh(expert=8), rules)


def test_logical_axis_names_are_a_closed_set():
    """A misspelt logical name raises instead of silently replicating; the model uses only known names."""
    with pytest.raises(shd.ShardingError, match="unknown logical axis name 'expert'"):
        shd.Rules.of({"expert": "expert"})  # the logical name is `experts`
    with pytest.raises(shd.ShardingError, match="unknown logical axis name 'embd'"):
        shd.INFERENCE.spec(("embd", None))
    names = {n for spec in jax.tree_util.tree_leaves(zaya_jax.logical_axes(CONFIG), is_leaf=lambda x: isinstance(x, P))
             for n in spec if n is not None}
    assert names <= shd.LOGICAL_AXES


def test_active_mesh_rejects_foreign_axis_names():
    """A mesh with other axis names is an error, not a silent unsharded run."""
    assert mesh_lib.active_mesh() is None
    with jax.set_mesh(shd.make_mesh(expert=8)):
        assert mesh_lib.active_mesh() is not None
    with jax.set_mesh(shd.make_mesh(devices=jax.devices()[:1])):
        assert mesh_lib.active_mesh() is None  # splits nothing
    with jax.set_mesh(jax.make_mesh((8,), ("ep",), (jax.sharding.AxisType.Auto,))):
        with pytest.raises(shd.ShardingError, match=r"axes \('ep',\)"):
            mesh_lib.active_mesh()


def test_indivisible_dimension_is_an_error():
    config = CONFIG.__class__(**{**CONFIG.__dict__, "num_experts": 6})
    with pytest.raises(shd.ShardingError, match=r"experts.*size 6.*not divisible by mesh axes \('expert',\)"):
        shd.param_specs(config, shd.make_mesh(expert=4, tensor=2))


def test_param_specs_follow_the_presets():
    specs = shd.param_specs(CONFIG, shd.make_mesh(expert=4, tensor=2))
    assert specs["layers"]["experts"]["gate_up"] == P(None, "expert", None, "tensor")
    assert specs["layers"]["experts"]["down"] == P(None, "expert", "tensor", None)
    assert specs["layers"]["attn"]["cca"]["q_proj"]["kernel"] == P(None, None, "tensor")
    assert specs["layers"]["attn"]["cca"]["k_proj"]["kernel"] == P(None, None, "tensor")  # 2 KV heads / 2
    assert specs["embed"] == P("tensor", None)
    train = shd.param_specs(CONFIG, shd.make_mesh(fsdp=2, expert=4), shd.TRAINING)
    assert train["layers"]["experts"]["gate_up"] == P(None, "expert", "fsdp", None)
    assert train["embed"] == P(None, "fsdp")


def test_kv_heads_fall_back_to_replication():
    """tensor=4 > 2 KV heads: K/V projections and cache heads replicate, queries still split."""
    mesh = shd.make_mesh(expert=2, tensor=4)
    specs = shd.param_specs(CONFIG, mesh)
    assert specs["layers"]["attn"]["cca"]["k_proj"]["kernel"] == P(None, None, None)
    assert specs["layers"]["attn"]["temp"] == P(None, None)
    assert specs["layers"]["attn"]["cca"]["q_proj"]["kernel"] == P(None, None, "tensor")
    cache = shd.cache_shardings(zaya_jax.init_cache(CONFIG, 2, 8), CONFIG, mesh)
    assert cache.k.spec == P(None, None, None, None, None)
    cache2 = shd.cache_shardings(zaya_jax.init_cache(CONFIG, 2, 8), CONFIG, shd.make_mesh(data=2, expert=2, tensor=2))
    assert cache2.k.spec == P(None, "data", "tensor", None, None)
    assert cache2.lengths.spec == P("data")


# ------------------------------------------------------------------ expert-parallel MoE vs the oracle


@pytest.mark.parametrize("impl", ["gather", "grouped", "tiled", "dense"])
@pytest.mark.parametrize("sizes", [dict(expert=8), dict(expert=2, tensor=4), dict(data=2, expert=2, tensor=2)])
def test_expert_parallel_matches_oracle(impl, sizes):
    E, D, F, T = 8, 24, 16, 24
    k = jax.random.split(jax.random.key(1), 5)
    gate_up = jax.random.normal(k[0], (E, D, 2 * F)) / np.sqrt(D)
    down = jax.random.normal(k[1], (E, F, D)) / np.sqrt(F)
    x = jax.random.normal(k[2], (T, D))
    idx = jax.random.randint(k[3], (T,), 0, E + 1)  # includes skip-route tokens
    gate = jax.random.uniform(k[4], (T,))
    skip_scale = jnp.where(idx == E, gate, 0.0)  # the scaled_identity skip route
    want = moe.experts_oracle(x, idx, gate, skip_scale, gate_up, down)
    mesh = shd.make_mesh(**sizes)
    from jax.sharding import NamedSharding

    gate_up = jax.device_put(gate_up, NamedSharding(mesh, P("expert", None, "tensor")))
    down = jax.device_put(down, NamedSharding(mesh, P("expert", "tensor", None)))
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: expert_parallel.experts(*a, impl=impl))(x, idx, gate, skip_scale, gate_up, down)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ whole model


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_forward_equals_unsharded(params, name):
    sizes, rules = MESHES[name]
    ids, mask = _batch()
    want = np.asarray(zaya_jax.forward(params, CONFIG, ids, mask))
    mesh = shd.make_mesh(**sizes)
    sharded = shd.shard_params(params, CONFIG, mesh, rules)
    rows = shd.batch_sharding(mesh, rules=rules, batch=ids.shape[0])
    with jax.set_mesh(mesh):
        got = zaya_jax.forward(sharded, CONFIG, jax.device_put(ids, rows), jax.device_put(mask, rows))
    real = mask.astype(bool)
    err = np.abs(np.asarray(got)[real] - want[real]).max()
    print(f"{name}: max abs logit error {err:.2e}")
    assert err <= 1e-5


def _expert_weight_gathers(hlo: str, config) -> list[str]:
    """All-gathers in ``hlo`` whose result has the shape of (a piece of) an expert weight: it holds the
    hidden size D and a dimension of the F family (2F, F, F/2)."""
    ffn = config.moe_intermediate_size
    f_family = {2 * ffn, ffn, ffn // 2}
    hits = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+all-gather(?:-start)?\(", line)
        if not m:
            continue
        for dims in re.findall(r"\[([\d,]+)\]", m.group(1)):
            shape = [int(d) for d in dims.split(",")]
            if config.hidden_size in shape and f_family & set(shape):
                hits.append(line.strip())
    return hits


def _compiled_decode_step(params, mesh, rules):
    """HLO text of one jitted cached decode step (1 new token per row) under ``mesh``."""
    B, max_len = 2, 16
    cache = zaya_jax.init_cache(CONFIG, B, max_len)
    cache = jax.device_put(cache, shd.cache_shardings(cache, CONFIG, mesh, rules))
    sharded = shd.shard_params(params, CONFIG, mesh, rules)
    tokens = jax.device_put(jnp.ones((B, 1), jnp.int32), shd.batch_sharding(mesh, rules=rules, batch=B))

    def step(params, cache, tokens):
        logits, cache, _ = zaya_jax.apply(params, CONFIG, tokens, zaya_jax.model.cached_context(cache, 1), cache)
        return logits, cache

    with jax.set_mesh(mesh):
        return jax.jit(step).lower(sharded, cache, tokens).compile().as_text()


@pytest.mark.parametrize("sizes", [dict(expert=4, tensor=2), dict(data=2, expert=4)])
def test_decode_step_never_all_gathers_expert_weights(params, sizes):
    hlo = _compiled_decode_step(params, shd.make_mesh(**sizes), shd.INFERENCE)
    assert "all-reduce" in hlo  # the expert-parallel psum is there
    assert _expert_weight_gathers(hlo, CONFIG) == []


def test_weight_gather_detector_fires_on_fsdp():
    """Control for the check above: under the training preset the weights are split over `fsdp` along
    D, so the MoE must all-gather them (FSDP by design) -- and the detector sees it."""
    params = zaya_jax.init(CONFIG, jax.random.key(0))
    hlo = _compiled_decode_step(params, shd.make_mesh(fsdp=2, expert=4), shd.TRAINING)
    assert _expert_weight_gathers(hlo, CONFIG)
