"""The native HF tensor layout of ZAYA1 and its map onto the stacked param pytree, both directions.

One table serves loading, conversion and export: each entry names the HF tensor (per layer or global),
the param path, and the transform between PyTorch's ``[out, in]`` layout and ours (``[in, out]``,
experts ``[E, D, 2F]`` / ``[E, F, D]``, conv taps first). Transforms are numpy-only and exact.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from zaya_jax import dtypes, quant
from zaya_jax.config import ZayaConfig

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor <-> one param leaf (one layer's slice of it when ``per_layer``)."""

    hf_name: str  # with "{l}" for the block index when per_layer
    path: ParamPath
    per_layer: bool
    hf_shape: Callable[[ZayaConfig], tuple[int, ...]]
    to_jax: Callable[[np.ndarray, ZayaConfig], np.ndarray]
    to_hf: Callable[[np.ndarray, ZayaConfig], np.ndarray]
    first_layer: int = 0  # router_states_scale exists from layer 1 on


def _same(a, c):
    return a


def _t(a, c):
    return a.T


def _experts_t(a, c):
    return np.swapaxes(a, 1, 2)


def _depthwise_to_jax(a, c):  # [C, 1, K0] -> [K0, C]
    return a[:, 0, :].T


def _depthwise_to_hf(a, c):  # [K0, C] -> [C, 1, K0]
    return a.T[:, None, :]


def _grouped_to_jax(a, c):  # [C = G*Dh_out, Dh_in, K1] -> [K1, G, Dh_in, Dh_out]
    g, dh = c.conv_groups, c.head_dim
    return a.reshape(g, dh, dh, a.shape[-1]).transpose(3, 0, 2, 1)


def _grouped_to_hf(a, c):  # [K1, G, Dh_in, Dh_out] -> [G*Dh_out, Dh_in, K1]
    k1, g, dh, _ = a.shape
    return a.transpose(1, 3, 2, 0).reshape(g * dh, dh, k1)


def _linear(hf, path, out_dim, in_dim, per_layer=True):
    """An nn.Linear weight [out, in] stored as a kernel [in, out]."""
    return Entry(hf, path, per_layer, lambda c: (out_dim(c), in_dim(c)), _t, _t)


def _vector(hf, path, dim, per_layer=True, first_layer=0):
    return Entry(hf, path, per_layer, lambda c: (dim(c),), _same, _same, first_layer)


_D = lambda c: c.hidden_size  # noqa: E731
_R = lambda c: c.router_hidden_size  # noqa: E731
_C = lambda c: c.conv_channels  # noqa: E731

_P = "model.layers.{l}."
ENTRIES: tuple[Entry, ...] = (
    Entry("model.embed_tokens.weight", ("embed",), False, lambda c: (c.vocab_size, c.hidden_size), _same, _same),
    _vector("model.input_hidden_states_scale", ("input_scale",), _D, per_layer=False),
    _vector("model.input_hidden_states_bias", ("input_bias",), _D, per_layer=False),
    _vector("model.norm.weight", ("final_norm", "scale"), _D, per_layer=False),
    _vector(_P + "input_layernorm.weight", ("layers", "input_norm", "scale"), _D),
    _linear(_P + "self_attn.qkv_proj.q_proj.weight", ("layers", "attn", "cca", "q_proj", "kernel"), lambda c: c.q_dim, _D),
    _linear(_P + "self_attn.qkv_proj.k_proj.weight", ("layers", "attn", "cca", "k_proj", "kernel"), lambda c: c.kv_dim, _D),
    _linear(_P + "self_attn.qkv_proj.v_proj_current.weight", ("layers", "attn", "cca", "v_current", "kernel"), lambda c: c.kv_dim // 2, _D),
    _linear(_P + "self_attn.qkv_proj.v_proj_delayed.weight", ("layers", "attn", "cca", "v_delayed", "kernel"), lambda c: c.kv_dim // 2, _D),
    Entry(_P + "self_attn.qkv_proj.conv_qk_depthwise.weight", ("layers", "attn", "cca", "conv_depthwise"), True,
          lambda c: (c.conv_channels, 1, c.cca_time0), _depthwise_to_jax, _depthwise_to_hf),
    _vector(_P + "self_attn.qkv_proj.conv_qk_depthwise.bias", ("layers", "attn", "cca", "conv_depthwise_bias"), _C),
    Entry(_P + "self_attn.qkv_proj.conv_qk_grouped.weight", ("layers", "attn", "cca", "conv_grouped"), True,
          lambda c: (c.conv_channels, c.head_dim, c.cca_time1), _grouped_to_jax, _grouped_to_hf),
    _vector(_P + "self_attn.qkv_proj.conv_qk_grouped.bias", ("layers", "attn", "cca", "conv_grouped_bias"), _C),
    _vector(_P + "self_attn.qk_norm.temp", ("layers", "attn", "temp"), lambda c: c.num_key_value_heads),
    _linear(_P + "self_attn.o_proj.weight", ("layers", "attn", "o_proj", "kernel"), _D, lambda c: c.q_dim),
    _vector(_P + "post_attention_layernorm.weight", ("layers", "post_attn_norm", "scale"), _D),
    _linear(_P + "mlp.gate.down_proj.weight", ("layers", "router", "down", "kernel"), _R, _D),
    _vector(_P + "mlp.gate.down_proj.bias", ("layers", "router", "down", "bias"), _R),
    _vector(_P + "mlp.gate.router_states_scale", ("layers", "router", "state_scale"), _R, first_layer=1),
    _vector(_P + "mlp.gate.router_mlp.norm.weight", ("layers", "router", "norm", "scale"), _R),
    _linear(_P + "mlp.gate.router_mlp.fc1.weight", ("layers", "router", "fc1", "kernel"), _R, _R),
    _vector(_P + "mlp.gate.router_mlp.fc1.bias", ("layers", "router", "fc1", "bias"), _R),
    _linear(_P + "mlp.gate.router_mlp.fc2.weight", ("layers", "router", "fc2", "kernel"), _R, _R),
    _vector(_P + "mlp.gate.router_mlp.fc2.bias", ("layers", "router", "fc2", "bias"), _R),
    _linear(_P + "mlp.gate.router_mlp.out_proj.weight", ("layers", "router", "out", "kernel"), lambda c: c.num_router_classes, _R),
    _vector(_P + "mlp.gate.balancing_biases", ("layers", "router", "balancing_biases"), lambda c: c.num_router_classes),
    Entry(_P + "mlp.experts.gate_up_proj", ("layers", "experts", "gate_up"), True,
          lambda c: (c.num_experts, 2 * c.moe_intermediate_size, c.hidden_size), _experts_t, _experts_t),
    Entry(_P + "mlp.experts.down_proj", ("layers", "experts", "down"), True,
          lambda c: (c.num_experts, c.hidden_size, c.moe_intermediate_size), _experts_t, _experts_t),
) + tuple(
    _vector(_P + f"{hf_mod}.{hf_leaf}", ("layers", mod, leaf), _D)
    for hf_mod, mod in (("post_attention_residual_scale", "post_attn_scale"), ("post_mlp_residual_scale", "post_mlp_scale"))
    for hf_leaf, leaf in (("hidden_states_scale", "hidden_scale"), ("hidden_states_bias", "hidden_bias"),
                          ("residual_scale", "residual_scale"), ("residual_bias", "residual_bias"))
)
LM_HEAD = Entry("lm_head.weight", ("lm_head",), False, lambda c: (c.vocab_size, c.hidden_size), _t, _t)


def entries(config: ZayaConfig) -> tuple[Entry, ...]:
    return ENTRIES + (() if config.tie_word_embeddings else (LM_HEAD,))


def expected_tensors(config: ZayaConfig) -> Iterator[tuple[str, Entry, int | None]]:
    """Every HF tensor a native checkpoint of ``config`` holds: (name, entry, layer or None)."""
    for e in entries(config):
        if e.per_layer:
            for layer in range(e.first_layer, config.num_hidden_layers):
                yield e.hf_name.format(l=layer), e, layer
        else:
            yield e.hf_name, e, None


def param_shape(entry: Entry, config: ZayaConfig) -> tuple[int, ...]:
    """Shape of the stacked param leaf of ``entry`` (leading layers axis when per_layer)."""
    one = entry.to_jax(np.empty(entry.hf_shape(config), np.float32), config).shape
    return ((config.num_hidden_layers,) + one) if entry.per_layer else one


def fill_value(entry: Entry) -> float | None:
    """Value of layer slices that have no HF tensor (layer 0's router_states_scale: ones, exact)."""
    return 1.0 if entry.first_layer else None


def leaves(config: ZayaConfig, dtype) -> Iterator[tuple[Entry, tuple[int, ...], np.dtype]]:
    """Every param leaf of ``config`` held in ``dtype``: (entry, stacked shape, leaf dtype)."""
    for entry in entries(config):
        yield entry, param_shape(entry, config), dtypes.leaf_dtype(entry.path, dtype)


def stored_arrays(config: ZayaConfig, dtype, scheme: quant.Scheme | None = None
                  ) -> Iterator[tuple[Entry, ParamPath, tuple[int, ...], np.dtype]]:
    """Every array of ``config``'s params held in ``dtype``, quantized with ``scheme`` (or not): (entry, its
    path, stacked shape, dtype). A quantized leaf is two arrays, ``path + ("values",)`` and ``path + ("scales",)``."""
    for entry, shape, leaf_dtype in leaves(config, dtype):
        axis = quant.QUANTIZED.get(entry.path) if scheme is not None else None
        if axis is None:
            yield entry, entry.path, shape, leaf_dtype
        else:
            yield entry, entry.path + ("values",), shape, quant.VALUES_DTYPE
            yield entry, entry.path + ("scales",), quant.scale_shape(shape, axis, scheme.of(entry.path)), quant.SCALES_DTYPE


def param_bytes(config: ZayaConfig, dtype, scheme: quant.Scheme | None = None) -> int:
    """Bytes of ``config``'s params held in ``dtype`` (balancing biases float32), quantized with ``scheme``."""
    return sum(int(np.prod(shape)) * d.itemsize for _, _, shape, d in stored_arrays(config, dtype, scheme))


# A leaf never quantized, whose dtype is the float params' (readers report it as the checkpoint's dtype).
DTYPE_PATH: ParamPath = ("final_norm", "scale")


def get_path(tree: dict, path: ParamPath):
    for key in path:
        tree = tree[key]
    return tree


def set_path(tree: dict, path: ParamPath, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
