"""The one table that maps logical axis names to mesh axes, and the shardings it gives.

Every parameter leaf carries logical axis names (``zaya_jax.logical_axes(config)``); a :class:`Rules`
table maps each name to mesh axes (``mesh.py``: ``data``, ``fsdp``, ``expert``, ``tensor``). The
names form a closed set, ``LOGICAL_AXES``: a name outside it is an error, never a silent
replication. Two presets: ``INFERENCE`` (weights replicated over ``data``, activations replicated:
lowest decode latency) and ``TRAINING`` (weights also split over ``fsdp`` along ``embed``, batch
over ``data x fsdp``).

Outside the MoE (which runs under ``shard_map``, see ``expert_parallel.py``) jit propagates
shardings from the placed inputs, so the model code needs no per-op sharding annotations.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import quant
from .config import ZayaConfig
from .host import to_host
from .mesh import AXES, ShardingError, make_mesh, parse_mesh, token_axes
from .model import init, logical_axes

# AXES, ShardingError, make_mesh, parse_mesh, token_axes (mesh.py) and to_host (host.py) are re-exported
# here for existing callers.
__all__ = [
    "AXES", "INFERENCE", "LOGICAL_AXES", "PRESETS", "SLOT_POOL", "TRAINING", "Rules", "ShardingError", "batch_sharding",
    "cache_shardings", "make_mesh", "param_shardings", "param_specs", "parse_mesh", "shard_params", "to_host",
    "token_axes",
]

# Every logical axis name: those of the params (``zaya_jax.logical_axes``; ``layers`` is the stacked
# layer axis) and of activations and the decode cache (``batch``, ``cache_kv_heads``).
LOGICAL_AXES = frozenset({
    "batch", "cache_kv_heads", "conv_channels", "conv_groups", "conv_taps", "embed", "experts", "kv_dim",
    "kv_heads", "layers", "moe_ffw", "q_dim", "router", "router_classes", "router_out", "vocab",
})
# Logical names whose dimension is a multiple of the KV heads: split over `tensor` only when the mesh's
# tensor size divides num_key_value_heads (ZAYA1-8B has 2), replicated otherwise.
KV_NAMES = ("kv_dim", "kv_heads", "cache_kv_heads")


def _as_axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _check_name(name: str) -> None:
    if name not in LOGICAL_AXES:
        raise ShardingError(f"unknown logical axis name {name!r}; the names are {sorted(LOGICAL_AXES)}")


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name (one of ``LOGICAL_AXES``) -> mesh axes (a tuple; empty = replicated).

    Names of ``LOGICAL_AXES`` without a rule replicate; a name outside it raises ShardingError.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str | tuple[str, ...] | None]) -> Rules:
        table = tuple(sorted((name, _as_axes(axes)) for name, axes in mapping.items()))
        for name, axes in table:
            _check_name(name)
            for axis in axes:
                if axis not in AXES:
                    raise ShardingError(f"rule {name!r} -> {axes} names unknown mesh axis {axis!r}; mesh axes are {AXES}")
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rule {name!r} -> {axes} maps one mesh axis twice")
        return cls(table)

    def __getitem__(self, name: str | None) -> tuple[str, ...]:
        if name is None:
            return ()
        _check_name(name)
        return dict(self.table).get(name, ())

    def replace(self, **mapping) -> Rules:
        return Rules.of({**dict(self.table), **mapping})

    def for_model(self, config: ZayaConfig, mesh: Mesh) -> Rules:
        """These rules with KV-head names replicated when ``tensor`` does not divide the KV heads."""
        kv_split = math.prod(mesh.shape[a] for a in self["kv_heads"]) if "kv_heads" in dict(self.table) else 1
        if config.num_key_value_heads % kv_split == 0:
            return self
        return self.replace(**{name: None for name in KV_NAMES})

    def spec(self, logical: P | tuple, shape: tuple[int, ...] | None = None, mesh: Mesh | None = None, what: str = "array") -> P:
        """Logical ``PartitionSpec`` -> mesh ``PartitionSpec``; checks divisibility when given shape and mesh."""
        out, used = [], {}
        for dim, name in enumerate(logical):
            for axis in self[name]:
                if axis in used:
                    raise ShardingError(f"{what}: mesh axis {axis!r} used twice (by {used[axis]!r} and {name!r})")
                used[axis] = name
            # Axes of size 1 split nothing: leave them out so specs stay readable.
            axes = tuple(a for a in self[name] if mesh is None or mesh.shape[a] > 1)
            if axes and shape is not None and mesh is not None:
                size = math.prod(mesh.shape[a] for a in axes)
                if shape[dim] % size:
                    raise ShardingError(
                        f"{what}: dimension {dim} ({name!r}, size {shape[dim]}) is not divisible by mesh axes "
                        f"{axes} (size {size})"
                    )
            out.append(axes[0] if len(axes) == 1 else (axes or None))
        return P(*out)


INFERENCE = Rules.of({
    "batch": "data",
    "vocab": "tensor",
    "q_dim": "tensor",
    "kv_dim": "tensor",
    "kv_heads": "tensor",
    "cache_kv_heads": "tensor",
    "experts": "expert",
    "moe_ffw": "tensor",
})
TRAINING = INFERENCE.replace(batch=("data", "fsdp"), embed="fsdp")
# An engine's slot pool (the KV cache of every slot, the largest thing a server holds): rows over the expert
# axis too. Attention is per row, so nothing but the MoE sees other rows, and it gathers its few tokens per
# decode step over ``expert`` (ZAYA1-8B, 64 slots x 8192 tokens: a 21.5 GB cache, whole on every chip of
# an expert=8 mesh without this).
SLOT_POOL = INFERENCE.replace(batch=("data", "expert"))
PRESETS = {"inference": INFERENCE, "training": TRAINING}


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_specs(config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE, quantization: str | None = None) -> dict:
    """Mesh PartitionSpecs for every parameter leaf (same pytree as the params, quantized with ``quantization``
    when given: a quantized leaf's values take its logical axes, and so do its scales, but on a contracting
    axis they hold a single entry of)."""
    rules = rules.for_model(config, mesh)
    logical = logical_axes(config)
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0)))
    if quantization is not None:
        shapes = jax.eval_shape(lambda: quant.quantize_params(init(config, jax.random.key(0)), quantization))
        logical = jax.tree.map(quant.specs_like, logical, shapes, is_leaf=_is_spec)

    def one(path, logical, shape):
        return rules.spec(logical, shape.shape, mesh, "param " + jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(one, logical, shapes, is_leaf=_is_spec)


def param_shardings(config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE, quantization: str | None = None) -> dict:
    """NamedShardings for every parameter leaf (see ``param_specs``)."""
    specs = param_specs(config, mesh, rules, quantization)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_params(params: dict, config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE) -> dict:
    """Places params (host or device arrays, one process; float or quantized) into their sharded layout."""
    return jax.device_put(params, param_shardings(config, mesh, rules, quant.scheme_of(params)))


def batch_sharding(mesh: Mesh, rank: int = 2, rules: Rules = INFERENCE, batch: int | None = None) -> NamedSharding:
    """Sharding of a ``[B, ...]`` array of rank ``rank`` split over the batch rule's axes."""
    shape = None if batch is None else (batch,) + (1,) * (rank - 1)
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (rank - 1), shape, mesh, "batch"))


def cache_shardings(cache, config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE):
    """NamedShardings for a ``KVCache`` (same pytree): rows over ``batch``, K/V heads like the KV rule."""
    rules = rules.for_model(config, mesh)
    logical = {
        "k": (None, "batch", "cache_kv_heads", None, None),
        "v": (None, "batch", "cache_kv_heads", None, None),
        "conv": (None, "batch", None, None),
        "v_prev": (None, "batch", None),
        "lengths": ("batch",),
    }
    specs = {name: rules.spec(axes, getattr(cache, name).shape, mesh, f"cache.{name}") for name, axes in logical.items()}
    return cache.replace(**{name: NamedSharding(mesh, spec) for name, spec in specs.items()})
