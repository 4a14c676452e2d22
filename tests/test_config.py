"""ZayaConfig: native and legacy schemas, round trip through transformers, errors that name the key."""

import json

import pytest
import transformers

from zaya_jax import ConfigError, ZayaConfig

# Verbatim from the architecture reference (Zyphra/ZAYA1-8B-legacy config.json).
LEGACY_8B = {
    "activation_func": "swiglu", "activation_func_fp8_input_store": False, "add_bias_linear": False,
    "architectures": ["ZayaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bias_activation_fusion": True, "bos_token_id": 2, "cca": True, "dtype": "bfloat16", "eos_token_id": 106,
    "ffn_hidden_size": 4096, "gated_linear_unit": True, "hidden_size": 2048, "head_dim": 128, "kv_channels": 128,
    "lm_head_bias": False, "mamba_cache_dtype": "float32", "max_position_embeddings": 131072, "model_type": "zaya",
    "moe_router_topk": 1, "norm_epsilon": 1e-05, "normalization": "RMSNorm", "num_attention_heads": 8,
    "num_experts": 16, "num_hidden_layers": 80, "num_key_value_heads": 2, "num_query_groups": 2, "pad_token_id": 0,
    "partial_rotary_factor": 0.5, "residual_in_fp32": True, "rope_scaling": False, "rope_theta": 5000000,
    "scale_residual_merge": True, "sliding_window": None, "use_cache": True, "vocab_size": 262272,
    "zaya_mlp_expansion": 256, "zaya_use_eda": True, "zaya_use_mod": True,
}


def test_defaults_are_zaya1_8b():
    native = ZayaConfig.from_hf_dict(transformers.ZayaConfig().to_dict())
    assert native == ZayaConfig().replace(extra=native.extra)
    assert (native.q_dim, native.kv_dim, native.conv_channels, native.conv_groups) == (1024, 256, 1280, 10)
    assert native.rotary_dim == 64 and native.rope_theta_for("hybrid") == 5e6


def test_legacy_schema_translates_to_native():
    legacy = ZayaConfig.from_hf_dict(LEGACY_8B)
    native = ZayaConfig.from_hf_dict(transformers.ZayaConfig().to_dict())
    for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size", "cca_time0", "cca_time1",
                  "rms_norm_eps", "layer_types", "rope_theta", "partial_rotary_factor", "tie_word_embeddings",
                  "mod_skip"):
        assert getattr(legacy, field) == getattr(native, field), field


def test_legacy_dict_round_trip():
    """to_legacy_hf_dict writes what the legacy reader reads back; on the release config it restates
    the release's legacy config.json."""
    config = ZayaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                        router_hidden_size=16, layer_types=("hybrid", "hybrid_sliding", "hybrid"), sliding_window=6,
                        tie_word_embeddings=False, eos_token_id=(1, 106))
    assert ZayaConfig.from_hf_dict(config.to_legacy_hf_dict()) == config
    written = ZayaConfig.from_hf_dict(LEGACY_8B).to_legacy_hf_dict()
    assert {k: v for k, v in written.items() if k in LEGACY_8B} == {k: v for k, v in LEGACY_8B.items() if k in written}


def test_from_pretrained_and_round_trip_through_transformers(tmp_path):
    hf = transformers.ZayaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                                 router_hidden_size=16, layer_types=["hybrid", "hybrid_sliding", "hybrid"],
                                 sliding_window=8, tie_word_embeddings=False, cca_time0=3)
    hf.save_pretrained(tmp_path)
    ours = ZayaConfig.from_pretrained(tmp_path)
    assert ours.layer_types == ("hybrid", "hybrid_sliding", "hybrid") and ours.sliding_window == 8
    assert not ours.tie_word_embeddings and ours.cca_time0 == 3
    back = transformers.ZayaConfig(**ours.to_hf_dict())
    for key in ("vocab_size", "num_hidden_layers", "layer_types", "sliding_window", "tie_word_embeddings", "cca_time0",
                "rope_parameters", "head_dim"):
        assert getattr(back, key) == getattr(hf, key), key
    assert ZayaConfig.from_hf_dict(json.loads(json.dumps(ours.to_hf_dict()))) == ours
    hash(ours)  # usable as a static jit argument


@pytest.mark.parametrize("change, key", [
    ({"num_experts_per_tok": 2}, "num_experts_per_tok"),
    ({"num_attention_heads": 6, "num_key_value_heads": 4}, "num_key_value_heads"),
    ({"layer_types": ["hybrid_sliding"] * 40}, "sliding_window"),
    ({"model_type": "llama"}, "model_type"),
    ({"layer_types": ["hybrid", "full"] * 20}, "layer_types"),
    ({"hidden_size": "big"}, "hidden_size"),
    ({"attention_bias": True}, "attention_bias"),
    ({"num_hidden_layers": 3}, "layer_types"),
])
def test_invalid_configs_name_the_key(change, key):
    data = transformers.ZayaConfig().to_dict()
    data.update(change)
    with pytest.raises(ConfigError, match=key):
        ZayaConfig.from_hf_dict(data)


def test_missing_required_keys_are_named():
    data = transformers.ZayaConfig().to_dict()
    del data["hidden_size"], data["vocab_size"]
    with pytest.raises(ConfigError, match="hidden_size.*|vocab_size"):
        ZayaConfig.from_hf_dict(data)
    with pytest.raises(ConfigError, match="ffn_hidden_size"):
        ZayaConfig.from_hf_dict({k: v for k, v in LEGACY_8B.items() if k != "ffn_hidden_size"})


def test_bad_json_and_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ZayaConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ZayaConfig.from_pretrained(tmp_path)
