"""``zaya_jax.load(path, mesh=...)``: every leaf lands in its sharded layout with the right values,
from HF directories (native and legacy layouts) and converted (orbax) ones, reading only slices."""

import dataclasses

import jax
import numpy as np
import pytest

import zaya_jax
from legacy_layout import write_legacy
from zaya_jax import convert, sharded_load
from zaya_jax import sharding as shd

# Untied (so lm_head is loaded too); dims divisible by every axis size used below.
CONFIG = zaya_jax.ZayaConfig(
    vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, moe_intermediate_size=24, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    params = zaya_jax.init(CONFIG, jax.random.key(3))
    # Non-trivial values where init leaves constants (layer 0's state scale is filled, not read).
    params = jax.tree_util.tree_map(lambda a: a + 0.01 * np.arange(a.size, dtype=np.float32).reshape(a.shape) / a.size, params)
    router = params["layers"]["router"]
    router["state_scale"] = router["state_scale"].at[0].set(1.0)  # layer 0 has none in HF: ones
    root = tmp_path_factory.mktemp("sharded_load")
    convert.save_hf(params, CONFIG, str(root / "hf"))
    write_legacy(str(root / "hf"), str(root / "legacy"))
    convert.save(params, CONFIG, str(root / "converted"))
    _, want = zaya_jax.load(root / "hf")
    return root, want


def _check(params, want, mesh, rules):
    shardings = shd.param_shardings(CONFIG, mesh, rules)
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    for (path, leaf), sharding, ref in zip(flat, jax.tree_util.tree_leaves(shardings), jax.tree_util.tree_leaves(want)):
        name = jax.tree_util.keystr(path)
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), name
        assert leaf.dtype == ref.dtype, name
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref), err_msg=name)


@pytest.mark.parametrize("source", ["hf", "legacy", "converted"])
@pytest.mark.parametrize("sizes,rules", [(dict(expert=4, tensor=2), shd.INFERENCE), (dict(fsdp=2, expert=4), shd.TRAINING)])
def test_sharded_load_equals_plain_load(dirs, source, sizes, rules):
    root, want = dirs
    mesh = shd.make_mesh(**sizes)
    config, params = zaya_jax.load(root / source, mesh=mesh, rules=rules)
    assert config == dataclasses.replace(CONFIG, extra=config.extra)
    _check(params, want, mesh, rules)


def test_hf_reads_only_device_slices(dirs, monkeypatch):
    """Every expert-weight read is one device's block (E/4 experts x 2F/2 columns), never the whole tensor."""
    root, want = dirs
    reads = []
    real = sharded_load._get_slice

    def spy(ckpt, name, index):
        block = real(ckpt, name, index)
        reads.append((name, block.shape))
        return block

    monkeypatch.setattr(sharded_load, "_get_slice", spy)
    mesh = shd.make_mesh(expert=4, tensor=2)
    _, params = zaya_jax.load(root / "hf", mesh=mesh)
    _check(params, want, mesh, shd.INFERENCE)
    E, F, D = CONFIG.num_experts, CONFIG.moe_intermediate_size, CONFIG.hidden_size
    gate_up = [shape for name, shape in reads if name.endswith("gate_up_proj")]
    down = [shape for name, shape in reads if name.endswith("experts.down_proj")]
    # 8 distinct blocks per layer, each read once (replicas share it); HF layout [E, 2F, D] / [E, D, F].
    assert gate_up == [(E // 4, 2 * F // 2, D)] * 8 * CONFIG.num_hidden_layers
    assert down == [(E // 4, D, F // 2)] * 8 * CONFIG.num_hidden_layers


def test_layout_permutations_are_detected():
    from zaya_jax.formats import layout

    perms = {entry.path[-2:]: sharded_load._permutation(entry, CONFIG) for entry in layout.entries(CONFIG)}
    assert perms[("experts", "gate_up")] == (0, 2, 1)
    assert perms[("q_proj", "kernel")] == (1, 0)
    assert perms[("attn", "temp")] == (0,)
    assert perms[("cca", "conv_grouped")] is None  # a reshape: read whole, then sliced
