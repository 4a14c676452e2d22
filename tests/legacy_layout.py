"""Test helper: rewrites a native HF ZAYA checkpoint in the legacy 80-layer layout.

The tensor names are written from the documented name map (shared/reference/zaya1-architecture.md
§1.2 and §3.2) as a list of rename rules, independently of ``zaya_jax/formats/legacy.py``, so that the
converter is checked against the documentation rather than against itself. The legacy config.json is
``ZayaConfig.to_legacy_hf_dict`` (tests/test_config.py checks it against the reading side).
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from safetensors.numpy import load_file, save_file

from zaya_jax.config import ZayaConfig

# (native regex, legacy template); {a} = 2l (attention half-layer), {m} = 2l+1 (MoE half-layer).
_RULES = [
    (r"input_layernorm\.weight", "model.layers.{a}.input_norm.weight"),
    (r"self_attn\.qkv_proj\.q_proj\.weight", "model.layers.{a}.self_attn.qkv.linear_q.weight"),
    (r"self_attn\.qkv_proj\.k_proj\.weight", "model.layers.{a}.self_attn.qkv.linear_k.weight"),
    (r"self_attn\.qkv_proj\.v_proj_current\.weight", "model.layers.{a}.self_attn.qkv.val_proj1.weight"),
    (r"self_attn\.qkv_proj\.v_proj_delayed\.weight", "model.layers.{a}.self_attn.qkv.val_proj2.weight"),
    (r"self_attn\.qkv_proj\.conv_qk_depthwise\.(weight|bias)", "model.layers.{a}.self_attn.qkv.conv_qk.0.{0}"),
    (r"self_attn\.qkv_proj\.conv_qk_grouped\.(weight|bias)", "model.layers.{a}.self_attn.qkv.conv_qk.1.{0}"),
    (r"self_attn\.qk_norm\.temp", "model.layers.{a}.self_attn.qkv.temp"),
    (r"self_attn\.o_proj\.weight", "model.layers.{a}.self_attn.o_proj.weight"),
    (r"post_attention_layernorm\.weight", "model.layers.{m}.input_norm.weight"),
    (r"post_attention_residual_scale\.(\w+)", "model.layers.{m}.res_scale.{0}"),
    (r"mlp\.gate\.down_proj\.(weight|bias)", "model.layers.{m}.zaya_block.router.down_proj.{0}"),
    (r"mlp\.gate\.router_mlp\.norm\.weight", "model.layers.{m}.zaya_block.router.rmsnorm_eda.weight"),
    (r"mlp\.gate\.router_mlp\.fc1\.(weight|bias)", "model.layers.{m}.zaya_block.router.router_mlp.0.{0}"),
    (r"mlp\.gate\.router_mlp\.fc2\.(weight|bias)", "model.layers.{m}.zaya_block.router.router_mlp.2.{0}"),
    (r"mlp\.gate\.router_mlp\.out_proj\.weight", "model.layers.{m}.zaya_block.router.router_mlp.4.weight"),
    (r"mlp\.gate\.router_states_scale", "model.layers.{m}.zaya_block.router.router_states_scale"),
    (r"mlp\.gate\.balancing_biases", "model.layers.{m}.zaya_block.router.balancing_biases"),
]
_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.input_hidden_states_scale": "model.layers.0.res_scale.hidden_states_scale",
    "model.input_hidden_states_bias": "model.layers.0.res_scale.hidden_states_bias",
    "model.norm.weight": "model.final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def legacy_tensors(native: dict[str, np.ndarray], blocks: int) -> dict[str, np.ndarray]:
    out = {}
    for name, t in native.items():
        if name in _GLOBAL:
            out[_GLOBAL[name]] = t
            continue
        block, rest = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name).groups()
        block = int(block)
        a, m = 2 * block, 2 * block + 1
        if rest.startswith("post_mlp_residual_scale."):
            leaf = rest.split(".", 1)[1]
            out[f"model.layers.{2 * block + 2}.res_scale.{leaf}" if block + 1 < blocks else f"model.res_scale.{leaf}"] = t
        elif rest in ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
            fc = "linear_fc1" if rest.endswith("gate_up_proj") else "linear_fc2"
            for e in range(t.shape[0]):
                out[f"model.layers.{m}.zaya_block.experts.local_experts.{e}.{fc}.weight"] = np.ascontiguousarray(t[e])
        else:
            for pattern, template in _RULES:
                match = re.fullmatch(pattern, rest)
                if match:
                    out[template.format(*match.groups(), a=a, m=m)] = t
                    break
            else:
                raise KeyError(f"no legacy rule for {name}")
    return out


def write_legacy(native_dir: str, legacy_dir: str, shards: int = 2) -> None:
    """Writes ``native_dir`` (one model.safetensors) in the legacy layout, in ``shards`` files + index."""
    config = ZayaConfig.from_pretrained(native_dir)
    tensors = legacy_tensors(load_file(os.path.join(native_dir, "model.safetensors")), config.num_hidden_layers)
    os.makedirs(legacy_dir, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(legacy_dir, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    with open(os.path.join(legacy_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(legacy_dir, "config.json"), "w") as f:
        json.dump(config.to_legacy_hf_dict(), f)
