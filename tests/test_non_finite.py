"""Weights holding NaN or Inf: convert and load refuse them naming the tensor, unless allowed."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import zaya_jax
from zaya_jax import convert
from zaya_jax.cli import main
from zaya_jax.config import ZayaConfig
from zaya_jax.convert import CheckpointError
from zaya_jax.finite import _finite

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _poison(src, name, value):
    tensors = load_file(src / "model.safetensors")
    tensors[name] = tensors[name].copy()
    tensors[name].flat[5] = value
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})


def test_convert_and_load_name_a_non_finite_tensor(src, tmp_path, capsys):
    _poison(src, O_PROJ, np.nan)
    dst = tmp_path / "dst"
    with pytest.raises(CheckpointError, match=rf"tensor '{O_PROJ}' holds 1 non-finite value.*--allow-non-finite"):
        convert.convert(src, dst, progress=False)
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ["src"]
    with pytest.raises(CheckpointError, match=rf"tensor '{O_PROJ}' \(param layers/attn/o_proj/kernel, layer 1\)"):
        zaya_jax.load(src)
    assert main(["forward", str(src), "--prompt-ids", "1,2"]) == 2
    assert f"tensor '{O_PROJ}'" in capsys.readouterr().err

    convert.convert(src, dst, progress=False, allow_non_finite=True)  # the override
    with pytest.raises(CheckpointError, match=rf"tensor '{O_PROJ}' \(param layers/attn/o_proj/kernel, layer 1\)"):
        zaya_jax.load(dst)
    _, params = zaya_jax.load(dst, allow_non_finite=True)
    assert np.isnan(np.asarray(params["layers"]["attn"]["o_proj"]["kernel"][1])).sum() == 1
    assert main(["forward", str(dst), "--prompt-ids", "1,2", "--allow-non-finite"]) == 0


def test_load_names_an_infinite_global_tensor(src):
    _poison(src, "model.embed_tokens.weight", -np.inf)
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' \(param embed\) holds 1 non-finite"):
        zaya_jax.load(src)


def test_the_load_check_holds_no_copy_of_the_weights():
    """Checked a layer (or 64 MB of rows) at a time: a whole-leaf isfinite made XLA:CPU hold a float32
    copy of the weights (2x their bfloat16 bytes; 32 GB for ZAYA1-8B)."""
    config = ZayaConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=8, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=64, moe_intermediate_size=256, num_experts=8,
                        router_hidden_size=32)
    params = jax.eval_shape(lambda: zaya_jax.init(config, jax.random.key(0), jnp.bfloat16))
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    temp = _finite.lower(params).compile().memory_analysis().temp_size_in_bytes
    assert temp < 0.2 * weights, f"{temp} bytes of temporaries for {weights} bytes of weights"
