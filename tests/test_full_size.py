"""Full-size support, checked on small configs: the synthetic-checkpoint writer (``zaya_jax.synthetic``,
native and legacy) and the leaf checksums, single-copy loading (aligned host buffers handed to XLA without a copy) and the
inference programs' memory (no float32 copy of bf16 weights hoisted out of the loops).

The full-size run itself is ``python bench/full_size.py all`` (docs/full_size.md).
"""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import zaya_jax
from zaya_jax import convert, host, narrow, quant, synthetic
from zaya_jax.formats.checksums import verify
from zaya_jax.infer import decode

BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "full_size.py")
SMALL = zaya_jax.ZayaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            router_hidden_size=16)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("full_size")
    native, old = str(root / "native"), str(root / "legacy")
    synthetic.write_checkpoint(native, SMALL, seed=5, shard_bytes=40_000)
    synthetic.write_checkpoint(old, SMALL, seed=5, shard_bytes=40_000, legacy_layout=True)
    return root, native, old


def test_writer_native_layout_read_by_transformers(written):
    _, native, _ = written
    with open(os.path.join(native, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2  # sharded as requested
    model = transformers.ZayaForCausalLM.from_pretrained(native, dtype=torch.bfloat16)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.2.self_attn.qkv_proj.conv_qk_grouped.weight"):
        want = synthetic.synthetic_tensor(name, tuple(state[name].shape), 5)
        assert np.array_equal(state[name].view(torch.int16).numpy(), want.view(np.int16)), name
    for layer in model.model.layers:  # transformers' post-load value is the one written
        assert layer.mlp.gate.balancing_biases.tolist() == [0.0] * SMALL.num_experts + [-1.0]


def test_convert_verify_and_load_both_layouts(written):
    root, native, old = written
    dst = str(root / "converted")
    convert.convert(native, dst, progress=False)
    assert verify(native, dst)["all_equal"]
    assert verify(native, dst, sample_layers=2)["all_equal"]
    _, from_converted = zaya_jax.load(dst, dtype=jnp.bfloat16)
    _, from_native = zaya_jax.load(native)
    _, from_legacy = zaya_jax.load(old)
    chex.assert_trees_all_equal(from_converted, from_native, from_legacy, strict=True)
    assert from_converted["embed"].dtype == jnp.bfloat16
    assert from_converted["layers"]["router"]["balancing_biases"].dtype == jnp.float32


def test_verify_reports_a_changed_leaf(written):
    root, native, _ = written
    dst = str(root / "converted_bad")
    convert.convert(native, dst, progress=False)
    from zaya_jax.formats.orbax_store import OrbaxReader

    store = OrbaxReader(os.path.join(dst, "params"), SMALL).arrays[("layers", "attn", "o_proj", "kernel")]
    store[1, 0, 0].write(np.asarray(123.0, store.dtype.numpy_dtype)).result()
    assert verify(native, dst)["mismatched"] == ["layers/attn/o_proj/kernel"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="zero-copy placement is a CPU property")
def test_aligned_host_buffer_becomes_jax_array_without_copy():
    for shape, dtype in (((3, 1000, 7), jnp.bfloat16), ((17,), np.float32)):
        buf = host.empty(shape, dtype)
        assert host.is_aligned(buf)
        buf[...] = 1
        out = host.to_device(buf)
        assert out.unsafe_buffer_pointer() == buf.ctypes.data


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_inference_programs_do_not_hoist_float32_weight_copies(quantize, monkeypatch):
    """XLA:CPU upcasts bf16 dots to f32; hoisted out of the layer scan / decode loop, those converts
    would hold a float32 copy of the weights (2x their bf16 bytes, 4x their int8 bytes) for the whole
    program. Quantized weights are dequantized inside each step the same way. Row blocks of 1 MiB: the
    default 8 MiB block of float32 would hold this small model's whole (int8) embedding at once."""
    monkeypatch.setattr(narrow, "CONVERT_BLOCK_BYTES", 1 << 20)
    config = SMALL.replace(vocab_size=8192, hidden_size=256, moe_intermediate_size=256, num_experts=8)

    def make():
        params = zaya_jax.init(config, jax.random.key(0), jnp.bfloat16)
        return quant.quantize_params(params, quantize) if quantize else params

    params = jax.eval_shape(make)
    B, S, T = 1, 16, 32
    cache = jax.eval_shape(lambda: zaya_jax.init_cache(config, B, S, jnp.bfloat16))
    prefill = decode.prefill_chunk_compiled.lower(params, config, cache, jnp.zeros((B, S), jnp.int32),
                                                  jnp.ones((B,), jnp.int32), jnp.zeros((B, config.vocab_size)),
                                                  moe_impl="auto")
    slots = jax.eval_shape(lambda: decode.init_slots(zaya_jax.init_cache(config, B, T, jnp.bfloat16), 4))
    step = decode.decode_compiled.lower(params, config, slots, jnp.zeros((B,), bool), steps=4, moe_impl="auto")
    forward = zaya_jax.model._forward_jit.lower(params, config, jnp.zeros((1, 64), jnp.int32),
                                                jnp.ones((1, 64), jnp.int32), "auto")
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    for name, lowered in (("prefill", prefill), ("decode", step), ("forward", forward)):
        temp = lowered.compile().memory_analysis().temp_size_in_bytes
        assert temp < 0.5 * weights, f"{name}: {temp} bytes of temporaries for {weights} bytes of weights"


@pytest.mark.slow
def test_full_size_bench_two_layers(tmp_path):
    """The whole benchmark at the real widths with 2 (and 1) layers: ~4 GB of disk, a few minutes."""
    subprocess.run([sys.executable, BENCH, "all", "--workdir", str(tmp_path), "--layers", "2", "--small-layers", "1",
                    "--repeats", "1"], check=False)
    t = json.loads((tmp_path / "results.json").read_text())["targets"]
    assert t["convert_peak_rss_ok"] and t["convert_rss_within_10pct"] and t["verify_ok"]
    assert t["load_converted_2_rss_ok"] and t["load_hf_2_rss_ok"] and t["top1_ok"]
