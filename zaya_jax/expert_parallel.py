"""Expert- and tensor-parallel MoE: ``shard_map`` over the mesh, local dispatch, one ``psum``.

Inside the map every device holds ``E / expert`` experts and ``1 / tensor`` of each expert's hidden
size ``F``; tokens are split over ``data x fsdp`` (see ``mesh.token_axes``) and replicated over
``expert`` and ``tensor``. Each device maps global expert ids to its local ones (tokens routed to
other shards become its local skip route, so they cost nothing and give zero), runs the ordinary
single-device dispatch of ``moe.py`` on its local weights, and a ``psum`` over ``expert x tensor``
adds the partial outputs. Expert weights never move; only activations do.

Tensor parallelism splits ``gate_up [E, D, 2F]`` contiguously along ``2F``, so a device holds
``2F / tensor`` columns that are not matching gate/up pairs. The SwiGLU step therefore all-gathers
the (small) ``[n, 2F / tensor]`` activations over ``tensor`` and keeps the gate and up columns of its
own slice of ``F`` -- the rows of ``down [E, F, D]`` it holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import moe, quant
from .mesh import ShardingError, token_axes, varying


def _tensor_swiglu(h: jax.Array, tensor: int) -> jax.Array:
    """``h [n, 2F / tensor]`` (this device's columns of gate|up) -> ``[n, F / tensor]`` for its F-slice."""
    full = jax.lax.all_gather(h, "tensor", axis=h.ndim - 1, tiled=True)  # [n, 2F]
    ffn = full.shape[-1] // 2
    width = ffn // tensor
    start = jax.lax.axis_index("tensor") * width
    g = jax.lax.dynamic_slice_in_dim(full, start, width, axis=-1)
    u = jax.lax.dynamic_slice_in_dim(full, ffn + start, width, axis=-1)
    return jax.nn.silu(g) * u


def experts(x, idx, gate, skip_scale, gate_up, down, impl: str = "auto", mesh=None):
    """Same contract as ``moe.experts`` (``x [T, D] -> [T, D]``), run over ``mesh`` (default: the context mesh).

    gate_up: [E, D, 2F] split ``P('expert', None, 'tensor')``; down: [E, F, D] split ``P('expert', 'tensor', None)``
    (quantized: their scales alike, but for a per-channel down's single row of scales, replicated).
    """
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    n_exp, n_ten = mesh.shape["expert"], mesh.shape["tensor"]
    E, _, two_f = gate_up.shape
    if E % n_exp:
        raise ShardingError(f"num_experts ({E}) is not divisible by the mesh's expert axis ({n_exp})")
    if (two_f // 2) % n_ten:
        raise ShardingError(f"moe_intermediate_size ({two_f // 2}) is not divisible by the mesh's tensor axis ({n_ten})")
    rows = token_axes(mesh, x.shape[0]) or None
    act = (lambda h: _tensor_swiglu(h, n_ten)) if n_ten > 1 else None

    def local(x, idx, gate, gate_up, down):
        e_local = gate_up.shape[0]
        first = jax.lax.axis_index("expert") * e_local
        mine = (idx >= first) & (idx < first + e_local)
        local_idx = jnp.where(mine, idx - first, e_local)  # foreign and skip-route tokens -> local skip route
        # Every operand enters the dispatch varying over every axis along which devices' work differs:
        # the token axes and expert x tensor. Otherwise JAX inserts the missing `pvary`s where values
        # meet inside the dispatch -- e.g. the expert weights (invariant over data/fsdp) inside the tiled
        # path's per-tile lax.cond -- and their transposes, psums of the weight gradients over
        # data/fsdp, land inside the backward cond's branch: devices whose tokens fill different tiles
        # then disagree on entering it and the all-reduce never completes (XLA:CPU aborts in its
        # rendezvous). Made varying here, that psum runs once per layer, outside the dispatch.
        axes = (*(rows or ()), "expert", "tensor")
        x, local_idx, gate, gate_up, down = (jax.tree.map(lambda a: varying(a, axes), a)
                                             for a in (x, local_idx, gate, gate_up, down))
        y = moe.experts(x, local_idx, gate, jnp.zeros_like(gate), gate_up, down, impl, act=act)
        return jax.lax.psum(y, ("expert", "tensor"))

    y = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(rows, None), P(rows), P(rows), quant.specs_like(P("expert", None, "tensor"), gate_up),
                  quant.specs_like(P("expert", "tensor", None), down)),
        out_specs=P(rows, None),
    )(x, idx, gate, gate_up, down)
    return moe.add_skip(y, x, skip_scale)
