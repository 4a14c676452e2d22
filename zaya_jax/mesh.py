"""The device mesh: its four named axes, building one, and reading the one in context.

The bottom of the sharding stack (depends on jax only): the model, the expert-parallel MoE, the
logical-axis rules (``sharding.py``) and the loaders all import from here. The mesh has four named
axes, always in this order::

    data    batch rows (replicated weights)            fsdp    batch rows + weight shards (training)
    expert  MoE experts (expert parallelism)           tensor  heads, expert hidden size, vocabulary

All axes are ``AxisType.Auto``. Run a model under a mesh with ``with jax.set_mesh(mesh):``.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from .validate import is_integer

AXES = ("data", "fsdp", "expert", "tensor")
# The mesh axes that split token rows (the others replicate them).
TOKEN_AXES = ("data", "fsdp")


class ShardingError(ValueError):
    """A mesh, rule or array that cannot be sharded as asked; the message names the problem."""


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *, devices=None) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh of Auto axes over ``devices`` (default: all devices).

    The product of the sizes must equal the number of devices. Across processes (after
    ``jax.distributed.initialize``) ``jax.devices()`` lists every process's devices.
    """
    sizes = {"data": data, "fsdp": fsdp, "expert": expert, "tensor": tensor}
    for name, size in sizes.items():
        if not is_integer(size) or size < 1:
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


def active_mesh():
    """The context mesh (``jax.set_mesh``) when it splits anything, else None.

    Raises ShardingError on a mesh whose axes are not ``AXES``: the model would otherwise run it as
    if there were no mesh at all. Build meshes with :func:`make_mesh`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    if tuple(mesh.axis_names) != AXES:
        raise ShardingError(f"the context mesh has axes {tuple(mesh.axis_names)}; zaya-jax runs on meshes with "
                            f"axes {AXES} (zaya_jax.mesh.make_mesh)")
    return mesh if mesh.size > 1 else None


def token_axes(mesh, tokens: int) -> tuple[str, ...]:
    """The mesh axes that split ``tokens`` rows inside the expert-parallel MoE: ``data`` and ``fsdp``
    (those of size > 1), or none (tokens replicated) when ``tokens`` is not divisible by their product."""
    axes = tuple(a for a in TOKEN_AXES if mesh.shape.get(a, 1) > 1)
    return axes if tokens % math.prod(mesh.shape[a] for a in axes) == 0 else ()


def varying(a: jax.Array, axes) -> jax.Array:
    """``a`` (inside ``shard_map``) marked varying over those of ``axes`` it is not yet varying over."""
    missing = tuple(n for n in axes if n not in varying_axes(a))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def varying_axes(a: jax.Array) -> frozenset:
    """The manual mesh axes ``a`` varies over inside ``shard_map`` (none outside)."""
    return frozenset(jax.typeof(a).manual_axis_type.varying)
