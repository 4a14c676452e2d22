"""Weight-only quantization (``zaya_jax.quant``): quantize -> convert -> load -> forward / generate.

The quantized model must compute exactly what the float model computes on the dequantized weights (the
matmul paths read integers and scale inside the step, which changes nothing but rounding), on odd widths,
sliding layers and other CCA kernels, for every MoE dispatch, sharded or not.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_ref
import zaya_jax
from helpers import MESHES
from zaya_jax import cli, convert, moe, quant
from zaya_jax import sharding as shd
from zaya_jax.formats import layout
from zaya_jax.formats.hf_reader import CheckpointError
from zaya_jax.infer import generate

CASES = {  # name -> (transformers config, scheme)
    # sliding-window layers and CCA kernels of 3 and 4 in one model
    "sliding_conv-int8": (dict(hf_ref.CONFIGS["heads_conv"], num_hidden_layers=4, sliding_window=4, num_experts=4,
                               num_attention_heads=4, num_key_value_heads=2,
                               layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"]), "int8"),
    # widths no power of two divides far: int4 falls back to a scale per channel
    "odd-untied-int4": (dict(hf_ref.CONFIGS["untied"], hidden_size=72, moe_intermediate_size=40, router_hidden_size=24), "int4"),
    # 256-wide inputs: eight int4 groups of 32 per expert column; the rest int8
    "grouped-int4": (dict(hf_ref.TINY, hidden_size=256, moe_intermediate_size=256, router_hidden_size=32), "int4"),
}
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18]]


def dequantized(params: dict) -> dict:
    """The float params the quantized ones stand for (float32)."""
    return jax.tree.map(lambda w: quant.dequantize(w, jnp.float32) if quant.is_quantized(w) else w, params,
                        is_leaf=quant.is_quantized)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(config, float params, quantized params loaded from `zaya convert --quantize`, their directory, scheme)."""
    kwargs, scheme = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_ref.build(kwargs, root / "hf", seed=3)
    convert.convert(root / "hf", root / "q", quantize=scheme, progress=False)
    config, params = zaya_jax.load(root / "hf")
    _, qparams = zaya_jax.load(root / "q")
    return config, params, qparams, root / "q", scheme


def test_quantize_error_is_within_half_a_step():
    w = jax.random.normal(jax.random.key(0), (3, 256, 40)) * jnp.linspace(0.1, 3.0, 40)
    for scheme, groups in (("int8", 1), ("int4", 8)):
        q = quant.quantize(w, -2, quant.SCHEMES[scheme])
        assert q.values.dtype == jnp.int8 and q.scales.shape == (3, groups, 40)
        assert int(jnp.max(jnp.abs(q.values))) == quant.SCHEMES[scheme].qmax  # each group's largest hits qmax
        step = jnp.repeat(q.scales, 256 // groups, axis=1)
        assert bool(jnp.all(jnp.abs(quant.dequantize(q) - w) <= step / 2 * (1 + 1e-6)))


def test_converted_equals_quantized_in_memory(case):
    config, params, qparams, path, scheme = case
    want = quant.quantize_params(params, scheme)
    for p in quant.QUANTIZED:
        if p == ("lm_head",) and config.tie_word_embeddings:
            continue
        got, ref = _at(qparams, p), _at(want, p)
        assert quant.is_quantized(got) and got.scheme == scheme
        np.testing.assert_array_equal(got.values, ref.values)
        np.testing.assert_allclose(got.scales, ref.scales, rtol=1e-6)
    assert qparams["layers"]["attn"]["cca"]["conv_grouped"].dtype == jnp.float32  # not quantized
    with open(os.path.join(path, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["quantization"] == scheme and recorded["quantized_tensors"] == quant.SCHEMES[scheme].record()


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_quantized_forward_and_generate_equal_the_dequantized_model(case):
    config, params, qparams, _, scheme = case
    ids, mask = hf_ref.left_padded([9, 5, 7], config.vocab_size, seed=4)
    got = zaya_jax.forward(qparams, config, ids, mask)
    want = zaya_jax.forward(dequantized(qparams), config, ids, mask)
    assert float(jnp.max(jnp.abs(got - want))) <= 1e-4
    greedy = dict(max_new_tokens=6, stop_token_ids=[])
    assert generate(qparams, config, PROMPTS, **greedy).tokens == generate(dequantized(qparams), config, PROMPTS, **greedy).tokens
    if scheme != "int8":  # int4's error on random weights flips routes; its quality: docs/quantization.md
        return
    # against the unquantized model: the error int8 itself makes, well below the logits' spread
    exact = zaya_jax.forward(params, config, ids, mask)
    valid = np.asarray(mask, bool)
    err = np.abs(np.asarray(got - exact))[valid]
    assert err.mean() < 0.1 * float(np.asarray(exact)[valid].std())


@pytest.mark.parametrize("impl", [i for i in moe.MOE_IMPLS if i != "auto"])
@pytest.mark.parametrize("scheme", sorted(quant.SCHEMES))
def test_every_moe_dispatch_reads_quantized_experts(impl, scheme):
    E, D, F, T = 4, 256, 128, 9
    keys = jax.random.split(jax.random.key(1), 4)
    gate_up = quant.quantize(jax.random.normal(keys[0], (E, D, 2 * F)) / 16, -2, quant.SCHEMES[scheme])
    down = quant.quantize(jax.random.normal(keys[1], (E, F, D)) / 11, -2, quant.SCHEMES[scheme])
    x = jax.random.normal(keys[2], (T, D))
    idx = jax.random.randint(keys[3], (T,), 0, E + 1)  # E: the skip route
    gate = jnp.linspace(0.2, 0.9, T)
    want = moe.experts_oracle(x, idx, gate, jnp.zeros(T), quant.dequantize(gate_up), quant.dequantize(down))
    got = jax.jit(moe.experts, static_argnames="impl")(x, idx, gate, jnp.zeros(T), gate_up, down, impl=impl)
    np.testing.assert_allclose(got, want, atol=2e-5)


# Each scheme on each mesh once (every mesh compiles its own programs): int8 on both, int4 one per mesh.
SHARDED_ON = {"sliding_conv-int8": ("expert4_tensor2", "data2_expert4"), "odd-untied-int4": ("expert4_tensor2",),
              "grouped-int4": ("data2_expert4",)}


def test_sharded_quantized_generation_equals_unsharded(case, request):
    """Loaded straight into each mesh (orbax reads each device's slices), greedy tokens as unsharded."""
    meshes = SHARDED_ON[request.node.callspec.params["case"]]
    config, _, qparams, path, _ = case
    greedy = dict(max_new_tokens=6, stop_token_ids=[])
    want = generate(qparams, config, PROMPTS, **greedy).tokens
    ids, mask = hf_ref.left_padded([9, 5, 7], config.vocab_size, seed=4)
    logits = zaya_jax.forward(qparams, config, ids, mask)
    for name in meshes:
        sizes, rules = MESHES[name]
        mesh = shd.make_mesh(**sizes)
        _, sharded = zaya_jax.load(path, mesh=mesh, rules=rules)
        assert sharded["layers"]["experts"]["down"].scales.sharding.spec[1] == "expert"
        with jax.set_mesh(mesh):
            assert generate(sharded, config, PROMPTS, **greedy).tokens == want, name
            # 1e-4, or float32's precision where logits are large: grouped-int4's reach 190, where an ulp is
            # 1.5e-5 and a split batch's reordered sums differ by 8 ulps (6.9e-7 relative).
            np.testing.assert_allclose(zaya_jax.forward(sharded, config, ids, mask), logits, atol=1e-4, rtol=1e-6)


def test_export_refuses_quantized_unless_dequantized(case, tmp_path):
    config, _, qparams, path, scheme = case
    with pytest.raises(CheckpointError, match=f"{scheme}-quantized.*--dequantize"):
        convert.export(path, tmp_path / "hf", progress=False)
    assert not os.path.exists(tmp_path / "hf")
    convert.export(path, tmp_path / "hf", progress=False, dequantize=True)
    with open(tmp_path / "hf" / "config.json") as f:
        assert "quantization" not in json.load(f)
    _, exported = zaya_jax.load(tmp_path / "hf")
    ids = np.array([[3, 4, 5, 6]])
    np.testing.assert_allclose(zaya_jax.forward(exported, config, ids), zaya_jax.forward(qparams, config, ids), atol=1e-4)


def test_a_recorded_mixed_scheme_loads_and_equals_the_dequantized_model(tmp_path):
    """A scheme unlike the named one (int4 experts in groups of 16, an int4 head, int8 elsewhere) is what
    config.json records and what load reads back; the bytes layout reports are the loaded arrays'."""
    hf_ref.build(dict(hf_ref.TINY, hidden_size=96, moe_intermediate_size=48), tmp_path / "hf", seed=5)
    mixed = quant.Scheme("int4", 4, 16, tuple((p, 8, None) for p in quant.QUANTIZED if p[:2] == ("layers", "attn")))
    convert.convert(tmp_path / "hf", tmp_path / "q", quantize=mixed, progress=False)
    config, qparams = zaya_jax.load(tmp_path / "q")
    gate_up, q_proj = qparams["layers"]["experts"]["gate_up"], qparams["layers"]["attn"]["cca"]["q_proj"]["kernel"]
    assert gate_up.scales.shape[-2] == 96 // 16 and int(jnp.max(jnp.abs(gate_up.values))) == 7
    assert q_proj.scales.shape[-2] == 1 and int(jnp.max(jnp.abs(q_proj.values))) == 127
    assert qparams["embed"].scales.shape == (config.vocab_size, 96 // 16)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(qparams))
    # int4 values take a byte each on CPU, and a scale per 16 rows outweighs int8's one per channel here: the
    # mixed scheme is smaller than the float model, not than int8.
    assert layout.param_bytes(config, np.float32, mixed) == nbytes < layout.param_bytes(config, np.float32)
    ids, mask = hf_ref.left_padded([9, 5, 7], config.vocab_size, seed=4)
    got = zaya_jax.forward(qparams, config, ids, mask)
    assert float(jnp.max(jnp.abs(got - zaya_jax.forward(dequantized(qparams), config, ids, mask)))) <= 1e-4


def test_save_and_load_quantized_params_and_training_refuses_them(tmp_path):
    config = zaya_jax.ZayaConfig(**hf_ref.TINY)
    qparams = quant.quantize_params(zaya_jax.init(config, jax.random.key(0), jnp.bfloat16), "int8")
    zaya_jax.checkpoint.save(tmp_path / "m", config, qparams)
    _, loaded = zaya_jax.load(tmp_path / "m")
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), loaded, qparams))
    assert zaya_jax.model.compute_dtype(loaded) == jnp.bfloat16
    with pytest.raises(ValueError, match=r"needs float weights; these are quantized \(int8\)"):
        quant.require_float(loaded, "training")


def test_cli_convert_quantize(pristine, tmp_path):
    assert set(cli.QUANTIZATIONS) == set(quant.SCHEMES)
    dst = tmp_path / "q"
    assert cli.main(["convert", str(pristine), str(dst), "--quantize", "int8", "--no-progress"]) == 0
    with open(dst / "zaya_convert.json") as f:
        assert json.load(f)["quantization"] == "int8"
    assert cli.main(["export", str(dst), str(tmp_path / "hf"), "--no-progress"]) == 2  # refused, named
