"""ZayaConfig: the frozen, hashable model configuration.

Reads the transformers-native ``config.json`` schema of ``Zyphra/ZAYA1-8B`` and translates the legacy
Megatron-style schema of ``Zyphra/ZAYA1-8B-legacy`` (80 alternating layers). Every check names the
offending key, so a bad config fails at load time rather than as a shape error deep inside ``jit``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

LAYER_TYPES = ("hybrid", "hybrid_sliding")
MOD_SKIP_MODES = ("zero", "scaled_identity")
DEFAULT_ROPE_THETA = {"hybrid": 5_000_000.0, "hybrid_sliding": 10_000.0}

# Keys of the native schema that we read; anything else in config.json is kept verbatim in `extra` so
# that `to_hf_dict` round-trips files that carry bookkeeping keys (architectures, dtype, ...).
_REQUIRED_NATIVE_KEYS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
# Keys whose presence marks the legacy (Megatron-style) schema.
_LEGACY_MARKERS = ("norm_epsilon", "ffn_hidden_size", "zaya_mlp_expansion", "num_query_groups")


class ConfigError(ValueError):
    """A config.json that cannot describe a ZAYA model; the message names the key."""


@dataclasses.dataclass(frozen=True)
class ZayaConfig:
    """Architecture hyper-parameters of a ZAYA1 model (native transformers naming).

    Defaults are those of ZAYA1-8B. ``mod_skip`` chooses the output of the router's skip route
    ("MoD", class ``num_experts``): ``"zero"`` (native transformers/vLLM) or ``"scaled_identity"``
    (legacy Zyphra code: ``p * x``).
    """

    vocab_size: int = 262272
    hidden_size: int = 2048
    num_hidden_layers: int = 40
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: int = 128
    moe_intermediate_size: int = 2048
    num_experts: int = 16
    num_experts_per_tok: int = 1
    router_hidden_size: int = 256
    cca_time0: int = 2
    cca_time1: int = 2
    rms_norm_eps: float = 1e-5
    layer_types: tuple[str, ...] | None = None
    rope_theta: tuple[tuple[str, float], ...] = tuple(DEFAULT_ROPE_THETA.items())
    partial_rotary_factor: float = 0.5
    sliding_window: int | None = None
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    hidden_act: str = "silu"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: tuple[int, ...] = (106,)
    mod_skip: str = "zero"
    # Unknown keys of the source config.json, kept so that to_hf_dict() loses nothing.
    extra: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", ("hybrid",) * self.num_hidden_layers)
        else:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.eos_token_id, int):
            object.__setattr__(self, "eos_token_id", (self.eos_token_id,))
        elif self.eos_token_id is None:
            object.__setattr__(self, "eos_token_id", ())
        else:
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if isinstance(self.rope_theta, Mapping):
            object.__setattr__(self, "rope_theta", tuple(sorted(self.rope_theta.items())))
        self._validate()

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        for key in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size", "cca_time0", "cca_time1",
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{key}` must be a positive integer, got {value!r}")
        if self.num_experts_per_tok != 1:
            raise ConfigError(
                f"`num_experts_per_tok` must be 1 (ZAYA routes each token to one expert), got {self.num_experts_per_tok}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"`num_attention_heads` ({self.num_attention_heads}) must be divisible by "
                f"`num_key_value_heads` ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ConfigError(f"`head_dim` must be even (values are split into current/delayed halves), got {self.head_dim}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(
                f"`layer_types` has {len(self.layer_types)} entries but `num_hidden_layers` is {self.num_hidden_layers}"
            )
        for t in self.layer_types:
            if t not in LAYER_TYPES:
                raise ConfigError(f"`layer_types` entry {t!r} is not one of {LAYER_TYPES}")
        if "hybrid_sliding" in self.layer_types:
            if self.sliding_window is None:
                raise ConfigError("`sliding_window` must be set when `layer_types` contains 'hybrid_sliding'")
            if self.sliding_window < 1:
                raise ConfigError(f"`sliding_window` must be positive, got {self.sliding_window}")
        thetas = dict(self.rope_theta)
        for t in set(self.layer_types):
            if t not in thetas:
                raise ConfigError(f"`rope_parameters` has no entry for layer type {t!r}")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"`partial_rotary_factor` must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(
                f"`partial_rotary_factor` * `head_dim` must be even, got rotary dim {self.rotary_dim}"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"`hidden_act` must be 'silu' (SwiGLU experts), got {self.hidden_act!r}")
        if self.mod_skip not in MOD_SKIP_MODES:
            raise ConfigError(f"`mod_skip` must be one of {MOD_SKIP_MODES}, got {self.mod_skip!r}")

    # ------------------------------------------------------------------ derived sizes
    @property
    def q_dim(self) -> int:
        """Width of the latent queries, ``num_attention_heads * head_dim``."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the latent keys (and values), ``num_key_value_heads * head_dim``."""
        return self.num_key_value_heads * self.head_dim

    @property
    def conv_channels(self) -> int:
        """Channels of the CCA q/k convolution: queries then keys."""
        return self.q_dim + self.kv_dim

    @property
    def conv_groups(self) -> int:
        """Groups of the second (grouped) CCA convolution: one per query and key head."""
        return self.num_attention_heads + self.num_key_value_heads

    @property
    def conv_state_len(self) -> int:
        """Raw q/k frames the CCA convolution looks back: ``(cca_time0 - 1) + (cca_time1 - 1)``."""
        return self.cca_time0 - 1 + self.cca_time1 - 1

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def num_router_classes(self) -> int:
        """Real experts plus the skip route."""
        return self.num_experts + 1

    def rope_theta_for(self, layer_type: str) -> float:
        return dict(self.rope_theta)[layer_type]

    def replace(self, **changes) -> "ZayaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF schema
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ZayaConfig":
        """Reads ``config.json`` from a model directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file}")
        with open(file) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{file} is not valid JSON: {e}") from e
        return cls.from_hf_dict(data)

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any]) -> "ZayaConfig":
        """Builds a config from a native or legacy ``config.json`` dictionary."""
        data = dict(data)
        model_type = data.get("model_type")
        if model_type != "zaya":
            raise ConfigError(f"`model_type` must be 'zaya', got {model_type!r}")
        if is_legacy_dict(data):
            data = legacy_to_native_dict(data)
        missing = [k for k in _REQUIRED_NATIVE_KEYS if k not in data]
        if missing:
            raise ConfigError(f"config.json is missing required key(s): {', '.join(missing)}")
        for key, fixed in (("attention_bias", False), ("lm_head_bias", False)):
            if data.get(key, fixed) != fixed:
                raise ConfigError(f"`{key}` = {data[key]!r} is not supported (ZAYA1 has no such biases)")

        kwargs: dict[str, Any] = {}
        fields = {f.name for f in dataclasses.fields(cls)} - {"rope_theta", "partial_rotary_factor", "extra"}
        for name in fields:
            if name in data:
                kwargs[name] = data[name]
        if "head_dim" not in data:
            kwargs["head_dim"] = data["hidden_size"] // data["num_attention_heads"]

        rope = data.get("rope_parameters")
        thetas = dict(DEFAULT_ROPE_THETA)
        factors = set()
        if isinstance(rope, Mapping):
            for layer_type, params in rope.items():
                if layer_type == "rope_type":
                    continue
                if not isinstance(params, Mapping):
                    raise ConfigError(f"`rope_parameters.{layer_type}` must be a mapping, got {params!r}")
                if params.get("rope_type", "default") != "default":
                    raise ConfigError(
                        f"`rope_parameters.{layer_type}.rope_type` {params['rope_type']!r} is not supported (only 'default')"
                    )
                if "rope_theta" in params:
                    thetas[layer_type] = float(params["rope_theta"])
                if "partial_rotary_factor" in params:
                    factors.add(float(params["partial_rotary_factor"]))
        elif rope is not None:
            raise ConfigError(f"`rope_parameters` must be a mapping, got {rope!r}")
        if "partial_rotary_factor" in data and data["partial_rotary_factor"] is not None:
            factors.add(float(data["partial_rotary_factor"]))
        if len(factors) > 1:
            raise ConfigError(f"`partial_rotary_factor` differs between layer types: {sorted(factors)}")
        if factors:
            kwargs["partial_rotary_factor"] = factors.pop()
        kwargs["rope_theta"] = tuple(sorted(thetas.items()))
        known = fields | {"rope_parameters", "partial_rotary_factor", "attention_bias", "lm_head_bias", "model_type",
                          "architectures"}
        kwargs["extra"] = tuple(sorted((k, _freeze(v)) for k, v in data.items() if k not in known))
        try:
            return cls(**kwargs)
        except TypeError as e:  # a value of the wrong type, e.g. a string for an int
            raise ConfigError(str(e)) from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The native transformers ``config.json`` for this config."""
        out = {k: _thaw(v) for k, v in self.extra}
        thetas = dict(self.rope_theta)
        out.update(
            {
                "architectures": ["ZayaForCausalLM"],
                "model_type": "zaya",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "head_dim": self.head_dim,
                "moe_intermediate_size": self.moe_intermediate_size,
                "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "router_hidden_size": self.router_hidden_size,
                "cca_time0": self.cca_time0,
                "cca_time1": self.cca_time1,
                "rms_norm_eps": self.rms_norm_eps,
                "layer_types": list(self.layer_types),
                "rope_parameters": {
                    t: {"rope_type": "default", "rope_theta": thetas[t], "partial_rotary_factor": self.partial_rotary_factor}
                    for t in LAYER_TYPES
                    if t in thetas
                },
                "partial_rotary_factor": self.partial_rotary_factor,
                "sliding_window": self.sliding_window,
                "max_position_embeddings": self.max_position_embeddings,
                "tie_word_embeddings": self.tie_word_embeddings,
                "initializer_range": self.initializer_range,
                "hidden_act": self.hidden_act,
                "attention_bias": False,
                "lm_head_bias": False,
                "pad_token_id": self.pad_token_id,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id),
            }
        )
        if self.mod_skip != "zero":
            out["mod_skip"] = self.mod_skip
        return out

    def to_legacy_hf_dict(self) -> dict[str, Any]:
        """The legacy Megatron-style ``config.json`` (80 alternating layers) describing this model;
        :func:`legacy_to_native_dict` reads it back (the hybrid_sliding RoPE theta is not stored)."""
        native = self.to_hf_dict()
        sliding = [b for b, t in enumerate(self.layer_types) if t == "hybrid_sliding"]
        return {
            "architectures": ["ZayaForCausalLM"], "model_type": "zaya", "activation_func": "swiglu", "cca": True,
            "gated_linear_unit": True, "normalization": "RMSNorm", "add_bias_linear": False,
            "zaya_use_eda": True, "zaya_use_mod": True, "scale_residual_merge": True, "residual_in_fp32": True,
            "hidden_size": self.hidden_size, "vocab_size": self.vocab_size,
            "num_hidden_layers": 2 * self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_query_groups": self.num_key_value_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "kv_channels": self.head_dim,
            "ffn_hidden_size": 2 * self.moe_intermediate_size, "num_experts": self.num_experts,
            "moe_router_topk": self.num_experts_per_tok, "zaya_mlp_expansion": self.router_hidden_size,
            "norm_epsilon": self.rms_norm_eps, "rope_theta": self.rope_theta_for("hybrid"),
            "partial_rotary_factor": self.partial_rotary_factor, "cca_time0": self.cca_time0,
            "cca_time1": self.cca_time1, "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": native["eos_token_id"], "pad_token_id": self.pad_token_id,
            # legacy swa_layers: 80-layer indices of the attention halves; its window excludes the current token
            "swa_layers": [2 * b for b in sliding] or None,
            "sliding_window": self.sliding_window - 1 if sliding else None,
        }


def is_legacy_dict(data: Mapping[str, Any]) -> bool:
    return any(k in data for k in _LEGACY_MARKERS)


def legacy_to_native_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Translates the legacy Megatron-style schema (80 alternating layers) to the native one."""
    data = dict(data)
    for key in ("num_hidden_layers", "ffn_hidden_size"):
        if key not in data:
            raise ConfigError(f"legacy config.json is missing required key `{key}`")
    layers = data.pop("num_hidden_layers")
    if layers % 2:
        raise ConfigError(f"legacy `num_hidden_layers` must be even (attention/MoE pairs), got {layers}")
    topk = data.pop("moe_router_topk", 1)
    if data.get("zaya_use_eda", True) is not True or data.get("scale_residual_merge", True) is not True:
        raise ConfigError("legacy `zaya_use_eda` and `scale_residual_merge` must be true (the native model always uses them)")
    if data.get("zaya_use_mod", True) is not True:
        raise ConfigError("legacy `zaya_use_mod` must be true (ZAYA1 routers always have the skip route)")
    if data.get("cca", True) is not True:
        raise ConfigError("legacy `cca` must be true (ZAYA1 attention is CCA)")
    if data.get("clamp_temp", False):
        raise ConfigError("legacy `clamp_temp` = true is not supported")
    out = {
        k: v
        for k, v in data.items()
        if k not in (
            "norm_epsilon", "ffn_hidden_size", "zaya_mlp_expansion", "num_query_groups", "rope_theta",
            "swa_layers", "kv_channels", "activation_func", "gated_linear_unit", "normalization", "add_bias_linear",
            "zaya_use_eda", "zaya_use_mod", "scale_residual_merge", "residual_in_fp32", "cca", "clamp_temp",
            "zaya_high_prec", "bias_activation_fusion", "activation_func_fp8_input_store", "mamba_cache_dtype",
            "rope_scaling",
        )
    }
    blocks = layers // 2
    out["num_hidden_layers"] = blocks
    out["num_experts_per_tok"] = topk
    out["rms_norm_eps"] = data.get("norm_epsilon", 1e-5)
    out["moe_intermediate_size"] = data["ffn_hidden_size"] // 2
    out["router_hidden_size"] = data.get("zaya_mlp_expansion", 256)
    if "num_query_groups" in data:
        out["num_key_value_heads"] = data["num_query_groups"]
    if "head_dim" not in out and "kv_channels" in data:
        out["head_dim"] = data["kv_channels"]
    out.setdefault("cca_time0", 2)
    out.setdefault("cca_time1", 2)
    out.setdefault("tie_word_embeddings", True)
    # Legacy `swa_layers` lists 80-layer indices of attention layers that use a sliding window; the
    # native `sliding_window` counts the current token too, hence the +1.
    swa = data.get("swa_layers") or []
    if swa:
        if data.get("sliding_window") is None:
            raise ConfigError("legacy `swa_layers` is set but `sliding_window` is not")
        out["layer_types"] = ["hybrid_sliding" if 2 * b in swa else "hybrid" for b in range(blocks)]
        out["sliding_window"] = data["sliding_window"] + 1
    theta = float(data.get("rope_theta", DEFAULT_ROPE_THETA["hybrid"]))
    factor = data.get("partial_rotary_factor", 0.5)
    out["rope_parameters"] = {
        "hybrid": {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": factor},
        "hybrid_sliding": {"rope_type": "default", "rope_theta": DEFAULT_ROPE_THETA["hybrid_sliding"], "partial_rotary_factor": factor},
    }
    return out


def _freeze(value: Any) -> Any:
    """Makes JSON values hashable so the config stays usable as a static jit argument."""
    if isinstance(value, Mapping):
        return ("__dict__", tuple(sorted((k, _freeze(v)) for k, v in value.items())))
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "__dict__":
        return {k: _thaw(v) for k, v in value[1]}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value
