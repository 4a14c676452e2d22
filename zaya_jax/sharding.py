"""Device meshes and the one table that maps logical axis names to mesh axes.

The mesh has four named axes, always in this order::

    data    batch rows (replicated weights)            fsdp    batch rows + weight shards (training)
    expert  MoE experts (expert parallelism)           tensor  heads, expert hidden size, vocabulary

Every parameter leaf carries logical axis names (``zaya_jax.logical_axes(config)``); a :class:`Rules`
table maps each name to mesh axes. Two presets: ``INFERENCE`` (weights replicated over ``data``,
activations replicated: lowest decode latency) and ``TRAINING`` (weights also split over ``fsdp``
along ``embed``, batch over ``data x fsdp``).

All axes are ``AxisType.Auto``: outside the MoE (which runs under ``shard_map``, see
``expert_parallel.py``) jit propagates shardings from the placed inputs, so the model code needs no
per-op sharding annotations. Run a model under a mesh with ``with jax.set_mesh(mesh):``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from .config import ZayaConfig

AXES = ("data", "fsdp", "expert", "tensor")
# Logical names whose dimension is a multiple of the KV heads: split over `tensor` only when the mesh's
# tensor size divides num_key_value_heads (ZAYA1-8B has 2), replicated otherwise.
KV_NAMES = ("kv_dim", "kv_heads", "cache_kv_heads")


class ShardingError(ValueError):
    """A mesh, rule or array that cannot be sharded as asked; the message names the problem."""


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh of Auto axes over ``devices`` (default: all devices).

    The product of the sizes must equal the number of devices. Across processes (after
    ``jax.distributed.initialize``) ``jax.devices()`` lists every process's devices.
    """
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ShardingError(f"mesh axis {name!r} must be a positive integer, got {size!r}")
    devices = list(jax.devices() if devices is None else devices)
    if math.prod(sizes.values()) != len(devices):
        shape = " x ".join(f"{k}={v}" for k, v in sizes.items())
        raise ShardingError(f"mesh {shape} has {math.prod(sizes.values())} devices but {len(devices)} are available")
    return jax.make_mesh(tuple(sizes.values()), AXES, (AxisType.Auto,) * len(AXES), devices=devices)


def parse_mesh(text: str) -> dict[str, int]:
    """``"data=2,expert=4"`` -> ``{"data": 2, "expert": 4}`` (for ``--mesh`` options)."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in AXES or not value.isdigit():
            raise ShardingError(f"bad mesh entry {part!r}: expected NAME=SIZE with NAME one of {AXES}")
        if name in sizes:
            raise ShardingError(f"mesh axis {name!r} given twice in {text!r}")
        sizes[name] = int(value)
    return sizes


def _as_axes(value) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical axis name -> mesh axes (a tuple, possibly empty = replicated). Unlisted names replicate.

    Besides the parameter names of ``zaya_jax.logical_axes``, activations and the decode cache use
    ``batch`` and ``cache_kv_heads``.
    """

    table: tuple[tuple[str, tuple[str, ...]], ...]

    @classmethod
    def of(cls, mapping: Mapping[str, str | tuple[str, ...] | None]) -> Rules:
        table = tuple(sorted((name, _as_axes(axes)) for name, axes in mapping.items()))
        for name, axes in table:
            for axis in axes:
                if axis not in AXES:
                    raise ShardingError(f"rule {name!r} -> {axes} names unknown mesh axis {axis!r}; mesh axes are {AXES}")
            if len(set(axes)) != len(axes):
                raise ShardingError(f"rule {name!r} -> {axes} maps one mesh axis twice")
        return cls(table)

    def __getitem__(self, name: str | None) -> tuple[str, ...]:
        return dict(self.table).get(name, ()) if name is not None else ()

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
PRESETS = {"inference": INFERENCE, "training": TRAINING}


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_specs(config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE) -> dict:
    """Mesh PartitionSpecs for every parameter leaf (same pytree as the params)."""
    from .model import init, logical_axes

    rules = rules.for_model(config, mesh)
    shapes = jax.eval_shape(lambda: init(config, jax.random.key(0)))

    def one(path, logical, shape):
        return rules.spec(logical, shape.shape, mesh, "param " + jax.tree_util.keystr(path))

    return jax.tree_util.tree_map_with_path(one, logical_axes(config), shapes, is_leaf=_is_spec)


def param_shardings(config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE) -> dict:
    """NamedShardings for every parameter leaf."""
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh, rules), is_leaf=_is_spec)


def shard_params(params: dict, config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE) -> dict:
    """Places params (host or device arrays, one process) into their sharded layout."""
    return jax.device_put(params, param_shardings(config, mesh, rules))


def batch_sharding(mesh: Mesh, rank: int = 2, rules: Rules = INFERENCE, batch: int | None = None) -> NamedSharding:
    """Sharding of a ``[B, ...]`` array of rank ``rank`` split over the batch rule's axes."""
    shape = None if batch is None else (batch,) + (1,) * (rank - 1)
    return NamedSharding(mesh, rules.spec(("batch",) + (None,) * (rank - 1), shape, mesh, "batch"))


def cache_shardings(cache, config: ZayaConfig, mesh: Mesh, rules: Rules = INFERENCE):
    """NamedShardings for a ``KVCache`` (same pytree): rows over ``batch``, K/V heads like the KV rule."""
    rules = rules.for_model(config, mesh)
    logical = {
        "k": (None, "batch", None, "cache_kv_heads", None),
        "v": (None, "batch", None, "cache_kv_heads", None),
        "conv": (None, "batch", None, None),
        "v_prev": (None, "batch", None),
        "lengths": ("batch",),
    }
    specs = {name: rules.spec(axes, getattr(cache, name).shape, mesh, f"cache.{name}") for name, axes in logical.items()}
    return cache.replace(**{name: NamedSharding(mesh, spec) for name, spec in specs.items()})


def token_axes(mesh, tokens: int) -> tuple[str, ...]:
    """The mesh axes that split ``tokens`` rows inside the expert-parallel MoE: ``data`` and ``fsdp``
    (those of size > 1), or none (tokens replicated) when ``tokens`` is not divisible by their product."""
    axes = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
    return axes if tokens % max(1, int(np.prod([mesh.shape[a] for a in axes]))) == 0 else ()


def to_host(array) -> np.ndarray:
    """A jax array as numpy on every process, gathering the other processes' shards when it spans them."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
