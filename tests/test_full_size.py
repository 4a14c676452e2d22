"""Full-size support, checked on small configs: the synthetic-checkpoint writer of bench/full_size.py
(native and legacy), single-copy loading (aligned host buffers handed to XLA without a copy) and the
inference programs' memory (no float32 copy of bf16 weights hoisted out of the loops).

The full-size run itself is ``python bench/full_size.py all`` (README, "Full-size ZAYA1-8B on one host").
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import zaya_jax
from zaya_jax import convert, host
from zaya_jax.infer import decode

_BENCH = os.path.join(os.path.dirname(__file__), "..", "bench", "full_size.py")
SMALL = zaya_jax.ZayaConfig(vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            router_hidden_size=16)


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("full_size", _BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def written(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("full_size")
    native, old = str(root / "native"), str(root / "legacy")
    bench.write_checkpoint(native, seed=5, config=SMALL, shard_bytes=40_000)
    bench.write_checkpoint(old, seed=5, config=SMALL, shard_bytes=40_000, legacy=True)
    return root, native, old


def test_writer_native_layout_read_by_transformers(written, bench):
    _, native, _ = written
    with open(os.path.join(native, "model.safetensors.index.json")) as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 2  # sharded as requested
    model = transformers.ZayaForCausalLM.from_pretrained(native, dtype=torch.bfloat16)
    state = model.state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.gate_up_proj",
                 "model.layers.2.self_attn.qkv_proj.conv_qk_grouped.weight"):
        want = bench.synthetic_tensor(name, tuple(state[name].shape), 5)
        assert np.array_equal(state[name].view(torch.int16).numpy(), want.view(np.int16)), name
    for layer in model.model.layers:  # transformers' post-load value is the one written
        assert layer.mlp.gate.balancing_biases.tolist() == [0.0] * SMALL.num_experts + [-1.0]


def test_convert_verify_and_load_both_layouts(written, bench):
    root, native, old = written
    dst = str(root / "converted")
    convert.convert(native, dst, progress=False)
    assert bench.verify(native, dst)["all_equal"]
    assert bench.verify(native, dst, sample_layers=2)["all_equal"]
    _, from_converted = zaya_jax.load(dst, dtype=jnp.bfloat16)
    _, from_native = zaya_jax.load(native)
    _, from_legacy = zaya_jax.load(old)
    for tree in (from_native, from_legacy):
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                               from_converted, tree)
    assert from_converted["embed"].dtype == jnp.bfloat16
    assert from_converted["layers"]["router"]["balancing_biases"].dtype == jnp.float32


def test_verify_reports_a_changed_leaf(written, bench):
    root, native, _ = written
    dst = str(root / "converted_bad")
    convert.convert(native, dst, progress=False)
    from zaya_jax.convert.orbax_store import OrbaxReader

    store = OrbaxReader(os.path.join(dst, "params"), SMALL).arrays[("layers", "attn", "o_proj", "kernel")]
    store[1, 0, 0].write(np.asarray(123.0, store.dtype.numpy_dtype)).result()
    assert bench.verify(native, dst)["mismatched"] == ["layers/attn/o_proj/kernel"]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="zero-copy placement is a CPU property")
def test_aligned_host_buffer_becomes_jax_array_without_copy():
    for shape, dtype in (((3, 1000, 7), jnp.bfloat16), ((17,), np.float32)):
        buf = host.empty(shape, dtype)
        assert host.is_aligned(buf)
        buf[...] = 1
        out = host.to_device(buf)
        assert out.unsafe_buffer_pointer() == buf.ctypes.data


def test_inference_programs_do_not_hoist_float32_weight_copies():
    """XLA:CPU upcasts bf16 dots to f32; hoisted out of the layer scan / decode loop, those converts
    would hold a float32 copy of the weights (2x their bf16 bytes) for the whole program."""
    config = SMALL.replace(vocab_size=8192, hidden_size=256, moe_intermediate_size=256, num_experts=8)
    params = jax.eval_shape(lambda: zaya_jax.init(config, jax.random.key(0), jnp.bfloat16))
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
def test_full_size_bench_two_layers(bench, tmp_path):
    """The whole benchmark at the real widths with 2 (and 1) layers: ~4 GB of disk, a few minutes."""
    results = bench.run_all(bench.main.__globals__["argparse"].Namespace(
        workdir=str(tmp_path), layers=2, small_layers=1, seed=0, legacy=False, steps=None, repeats=1,
        verify_sample_layers=None, reuse_small=False, min_available_gib=None))
    t = results["targets"]
    assert t["convert_peak_rss_ok"] and t["convert_rss_within_10pct"] and t["verify_ok"]
    assert t["load_converted_2_rss_ok"] and t["load_hf_2_rss_ok"] and t["top1_ok"]
