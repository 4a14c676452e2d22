"""The legacy 80-layer layout of ZAYA1 (``Zyphra/ZAYA1-8B-legacy``) expressed as native tensor names.

Legacy layer ``2l`` is block ``l``'s attention half, ``2l+1`` its MoE half. Experts are stored one
tensor per expert (``linear_fc1`` ``[2F, D]``, ``linear_fc2`` ``[D, F]``) and are stacked along a new
leading axis into the native ``[E, 2F, D]`` / ``[E, D, F]``. The residual merges live one half-layer
later than in the native layout: ``model.layers.0.res_scale`` is the input scaling,
``model.layers.{2l}.res_scale`` (l >= 1) closes block ``l-1``, and ``model.res_scale`` closes the last
block. No value changes: the map only renames and stacks.
"""

from __future__ import annotations

from zaya_jax.config import ZayaConfig

from . import layout

_ATTN = {  # native suffix under model.layers.{l}. -> legacy suffix under model.layers.{2l}.
    "input_layernorm.weight": "input_norm.weight",
    "self_attn.qkv_proj.q_proj.weight": "self_attn.qkv.linear_q.weight",
    "self_attn.qkv_proj.k_proj.weight": "self_attn.qkv.linear_k.weight",
    "self_attn.qkv_proj.v_proj_current.weight": "self_attn.qkv.val_proj1.weight",
    "self_attn.qkv_proj.v_proj_delayed.weight": "self_attn.qkv.val_proj2.weight",
    "self_attn.qkv_proj.conv_qk_depthwise.weight": "self_attn.qkv.conv_qk.0.weight",
    "self_attn.qkv_proj.conv_qk_depthwise.bias": "self_attn.qkv.conv_qk.0.bias",
    "self_attn.qkv_proj.conv_qk_grouped.weight": "self_attn.qkv.conv_qk.1.weight",
    "self_attn.qkv_proj.conv_qk_grouped.bias": "self_attn.qkv.conv_qk.1.bias",
    "self_attn.qk_norm.temp": "self_attn.qkv.temp",
    "self_attn.o_proj.weight": "self_attn.o_proj.weight",
}
_MOE = {  # native suffix under model.layers.{l}. -> legacy suffix under model.layers.{2l+1}.
    "post_attention_layernorm.weight": "input_norm.weight",
    "mlp.gate.down_proj.weight": "zaya_block.router.down_proj.weight",
    "mlp.gate.down_proj.bias": "zaya_block.router.down_proj.bias",
    "mlp.gate.router_states_scale": "zaya_block.router.router_states_scale",
    "mlp.gate.router_mlp.norm.weight": "zaya_block.router.rmsnorm_eda.weight",
    "mlp.gate.router_mlp.fc1.weight": "zaya_block.router.router_mlp.0.weight",
    "mlp.gate.router_mlp.fc1.bias": "zaya_block.router.router_mlp.0.bias",
    "mlp.gate.router_mlp.fc2.weight": "zaya_block.router.router_mlp.2.weight",
    "mlp.gate.router_mlp.fc2.bias": "zaya_block.router.router_mlp.2.bias",
    "mlp.gate.router_mlp.out_proj.weight": "zaya_block.router.router_mlp.4.weight",
    "mlp.gate.balancing_biases": "zaya_block.router.balancing_biases",
}
_EXPERTS = {  # stacked native tensor -> per-expert legacy tensor under model.layers.{2l+1}.
    "mlp.experts.gate_up_proj": "zaya_block.experts.local_experts.{e}.linear_fc1.weight",
    "mlp.experts.down_proj": "zaya_block.experts.local_experts.{e}.linear_fc2.weight",
}
_GLOBAL = {
    "model.embed_tokens.weight": "model.embed_tokens.weight",
    "model.input_hidden_states_scale": "model.layers.0.res_scale.hidden_states_scale",
    "model.input_hidden_states_bias": "model.layers.0.res_scale.hidden_states_bias",
    "model.norm.weight": "model.final_norm.weight",
    "lm_head.weight": "lm_head.weight",
}


def _block_sources(layer: int, blocks: int, suffix: str) -> tuple[str, ...]:
    attn, moe = f"model.layers.{2 * layer}.", f"model.layers.{2 * layer + 1}."
    if suffix in _ATTN:
        return (attn + _ATTN[suffix],)
    if suffix in _MOE:
        return (moe + _MOE[suffix],)
    module, _, leaf = suffix.partition(".")
    if module == "post_attention_residual_scale":
        return (f"{moe}res_scale.{leaf}",)
    if module == "post_mlp_residual_scale":
        closing = f"model.layers.{2 * layer + 2}." if layer + 1 < blocks else "model."
        return (f"{closing}res_scale.{leaf}",)
    raise KeyError(f"native tensor suffix {suffix!r} has no legacy name")


def sources(config: ZayaConfig) -> dict[str, tuple[str, ...]]:
    """Native tensor name -> the legacy tensor(s) holding it (several = per-expert, to stack on axis 0).

    Covers every tensor of :func:`layout.expected_tensors` for ``config`` (native schema: ``config``
    counts blocks, i.e. half the legacy ``num_hidden_layers``).
    """
    out = {}
    blocks = config.num_hidden_layers
    for name, entry, layer in layout.expected_tensors(config):
        if layer is None:
            out[name] = (_GLOBAL[name],)
            continue
        suffix = name.removeprefix(f"model.layers.{layer}.")
        if suffix in _EXPERTS:
            pattern = f"model.layers.{2 * layer + 1}." + _EXPERTS[suffix]
            out[name] = tuple(pattern.format(e=e) for e in range(config.num_experts))
        else:
            out[name] = _block_sources(layer, blocks, suffix)
    return out
