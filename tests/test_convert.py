"""Conversion round trips: HF -> converted directory -> logits, params -> HF -> transformers, legacy layout."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import hf_ref
import legacy_layout
import zaya_jax
from zaya_jax import checkpoint, convert
from zaya_jax.cli import main as zaya_main
from zaya_jax.formats import layout
from zaya_jax.formats.converted import PARAMS_DIR

LENGTHS = [9, 5, 1]


def assert_same_params(a: dict, b: dict) -> None:
    """Same tree, dtypes and values, bit for bit."""
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)

    def check(path, x, y):
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, f"{name}: {x.dtype} vs {y.dtype}"
        assert x.shape == y.shape, f"{name}: {x.shape} vs {y.shape}"
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{name} differs"

    jax.tree_util.tree_map_with_path(check, a, b)


@pytest.fixture(scope="module")
def jax_model():
    """Random params initialised in JAX (not from a transformers model), untied head."""
    config = zaya_jax.ZayaConfig.from_hf_dict(dict(hf_ref.CONFIGS["untied"], model_type="zaya"))
    params = zaya_jax.init(config, jax.random.key(7))
    params["layers"]["router"]["balancing_biases"] = jnp.full_like(params["layers"]["router"]["balancing_biases"], -1.0)
    return config, params


# Two configs cover stacking over several layers, sliding layers, an untied head and unusual head/conv
# shapes; the legacy test below takes the remaining ones.
@pytest.fixture(scope="module", params=["sliding", "untied"])
def converted(request, tmp_path_factory):
    """(name, HF dir, converted dir, reference model, summary) per reference config, float32."""
    root = tmp_path_factory.mktemp(f"conv_{request.param}")
    src, dst = root / "hf", root / "converted"
    model = hf_ref.build(request.param, src, seed=3, skip_bias=0.05)
    (src / "tokenizer.json").write_text('{"version": "1.0"}')
    (src / "chat_template.jinja").write_text("{{ messages }}")
    summary = convert.convert(src, dst, progress=False)
    return request.param, src, dst, model, summary


def test_converted_params_equal_hf_load(converted):
    _, src, dst, _, summary = converted
    config_src, params_src = zaya_jax.load(src)
    config_dst, params_dst = zaya_jax.load(dst)
    assert config_dst == config_src
    assert_same_params(params_dst, params_src)
    assert_same_params(params_dst, jax.tree_util.tree_map(jnp.asarray, convert.read_hf(str(src), config_src)))
    expected = len(list(layout.expected_tensors(config_src)))
    assert summary.tensors == expected
    assert summary.bytes == sum(x.nbytes for x in jax.tree_util.tree_leaves(params_src)) - _fill_bytes(params_src)


def _fill_bytes(params) -> int:
    """Bytes of layer-0 router_states_scale, which has no HF tensor (filled with ones)."""
    leaf = params["layers"]["router"]["state_scale"]
    assert np.all(np.asarray(leaf[0]) == 1.0)
    return leaf[0].nbytes


def test_converted_directory_contents(converted):
    _, src, dst, _, _ = converted
    assert (dst / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    assert (dst / "chat_template.jinja").read_text() == "{{ messages }}"
    config = json.loads((dst / "config.json").read_text())
    assert "ffn_hidden_size" not in config and config["dtype"] == "float32"
    manifest = json.loads((dst / convert.pipeline.MANIFEST).read_text())
    assert manifest["layout"] == "native" and manifest["assets"] == ["tokenizer.json", "chat_template.jinja", "generation_config.json"]
    assert not [p for p in os.listdir(dst.parent) if ".zaya-" in p]


def test_converted_logits_match_transformers(converted):
    name, _, dst, model, _ = converted
    ids, mask = hf_ref.left_padded(LENGTHS, model.config.vocab_size, seed=4)
    err = hf_ref.max_logit_error(dst, ids, mask, hf_ref.logits(model, ids, mask))
    print(f"{name}: converted float32 max abs logit error {err:.2e}")
    assert err <= 1e-4


def test_converted_restores_with_plain_orbax(converted):
    """The params directory is an ordinary orbax checkpoint."""
    import orbax.checkpoint as ocp

    _, src, dst, _, _ = converted
    restored = ocp.PyTreeCheckpointer().restore(str(dst / PARAMS_DIR))
    assert_same_params(jax.tree_util.tree_map(jnp.asarray, restored), zaya_jax.load(src)[1])


def test_export_loads_in_transformers_with_identical_logits(converted, tmp_path):
    """converted -> HF export -> transformers: bit-identical logits to the original model.

    transformers' from_pretrained re-initialises the skip route's balancing bias to -1.0 after loading,
    so the exported biases (checked against the original first) are copied back into the module by hand.
    """
    name, _, dst, model, _ = converted
    out_dir = tmp_path / "exported"
    convert.export(dst, out_dir, max_shard_bytes=20_000, progress=False)
    files = sorted(os.listdir(out_dir))
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    stored = {}
    for f in files:
        if f.endswith(".safetensors"):
            stored.update(load_file(out_dir / f))
    original = {k: v.numpy() for k, v in model.state_dict().items() if "inv_freq" not in k}
    if model.config.tie_word_embeddings:
        original.pop("lm_head.weight")
    assert sorted(stored) == sorted(original)
    for key, value in original.items():
        assert np.array_equal(stored[key], value), key

    loaded = transformers.ZayaForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    loaded.config._attn_implementation = "eager"
    with torch.no_grad():
        for i, layer in enumerate(loaded.model.layers):
            layer.mlp.gate.balancing_biases.copy_(torch.from_numpy(stored[f"model.layers.{i}.mlp.gate.balancing_biases"]))
    ids, mask = hf_ref.left_padded(LENGTHS, model.config.vocab_size, seed=5)
    np.testing.assert_array_equal(hf_ref.logits(loaded, ids, mask), hf_ref.logits(model, ids, mask))


def test_jax_params_to_transformers(jax_model, tmp_path):
    """Random JAX params -> save_hf -> transformers logits match zaya_jax.forward (float32, 1e-4).

    The skip-route biases are -1.0, the value transformers' from_pretrained forces, so nothing is patched.
    """
    config, params = jax_model
    convert.save_hf(params, config, tmp_path / "hf")
    assert_same_params(zaya_jax.load(tmp_path / "hf")[1], params)
    hf = transformers.ZayaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf.config._attn_implementation = "eager"
    ids, mask = hf_ref.left_padded(LENGTHS, config.vocab_size, seed=6)
    ref = hf_ref.logits(hf, ids, mask)
    out = np.asarray(zaya_jax.forward(params, config, ids, mask))
    real = mask.astype(bool)
    assert np.abs(out[real] - ref[real]).max() <= 1e-4


def test_bfloat16_conversion(converted, tmp_path):
    _, src, _, _, _ = converted
    convert.convert(src, tmp_path / "bf16", dtype="bfloat16", progress=False)
    _, params = zaya_jax.load(tmp_path / "bf16")
    assert params["embed"].dtype == jnp.bfloat16
    assert params["layers"]["router"]["balancing_biases"].dtype == jnp.float32
    assert_same_params(params, zaya_jax.load(src, dtype=jnp.bfloat16)[1])
    # load(dtype=...) casts a converted directory too.
    widened = zaya_jax.cast_params(params, jnp.float32)
    assert_same_params(zaya_jax.load(tmp_path / "bf16", dtype=jnp.float32)[1], widened)


@pytest.mark.parametrize("name", ["tiny", "heads_conv", "sliding"])
def test_legacy_layout_converts_to_the_same_params(name, tmp_path):
    native, legacy_dir = tmp_path / "native", tmp_path / "legacy"
    hf_ref.build(name, native, seed=8)
    legacy_layout.write_legacy(native, legacy_dir, shards=3)
    config_native, params_native = zaya_jax.load(native)
    config_legacy, params_legacy = zaya_jax.load(legacy_dir)
    assert config_legacy.replace(extra=()) == config_native.replace(extra=())
    assert_same_params(params_legacy, params_native)

    convert.convert(legacy_dir, tmp_path / "converted", progress=False)
    assert json.loads((tmp_path / "converted" / convert.pipeline.MANIFEST).read_text())["layout"] == "legacy"
    assert_same_params(zaya_jax.load(tmp_path / "converted")[1], params_native)

    # Exporting the legacy checkpoint directly yields the native tensors.
    convert.export(legacy_dir, tmp_path / "exported", progress=False)
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    original = load_file(native / "model.safetensors")
    assert sorted(exported) == sorted(original)
    for key in original:
        assert np.array_equal(exported[key], original[key]), key


def test_checkpoint_save_and_load(jax_model, tmp_path):
    config, params = jax_model
    params = zaya_jax.cast_params(params, jnp.bfloat16)
    checkpoint.save(tmp_path / "ckpt", config, params)
    loaded_config, loaded = zaya_jax.load(tmp_path / "ckpt")
    assert loaded_config.replace(extra=()) == config.replace(extra=())
    assert_same_params(loaded, params)
    with pytest.raises(FileExistsError):
        checkpoint.save(tmp_path / "ckpt", config, params)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        zaya_jax.load(tmp_path / "ckpt", mesh=object())


def test_cli_convert_and_export(tmp_path, capsys):
    src = tmp_path / "src"
    hf_ref.build("tiny", src, seed=9)
    dst = tmp_path / "cli"
    assert zaya_main(["convert", str(src), str(dst), "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] > 0 and report["bytes"] > 0 and report["peak_rss_bytes"] > 0
    before = sorted(os.listdir(dst))
    assert zaya_main(["convert", str(src), str(dst), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(os.listdir(dst)) == before
    assert zaya_main(["convert", str(src), str(dst), "--no-progress", "--force", "--dtype", "bfloat16"]) == 0
    assert json.loads((dst / "config.json").read_text())["dtype"] == "bfloat16"
    assert zaya_main(["export", str(dst), str(tmp_path / "hf"), "--no-progress"]) == 0
    assert "exported" in capsys.readouterr().out
    assert_same_params(zaya_jax.load(tmp_path / "hf")[1], zaya_jax.load(dst)[1])
