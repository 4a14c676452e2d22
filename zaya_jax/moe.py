"""Top-1 expert dispatch: one signature, several implementations, one oracle.

Every implementation computes, for tokens ``x [T, D]`` routed to ``idx [T]`` with gate ``gate [T]``::

    y[t] = gate[t] * down[idx[t]]( silu(gu[:F]) * gu[F:] ),   gu = x[t] @ gate_up[idx[t]]

with ``gate_up [E, D, 2F]`` (gate columns first) and ``down [E, F, D]``. Tokens with ``idx == E`` took
the router's skip route and get ``skip_scale[t] * x[t]`` (zero for the native behaviour).

- ``experts_oracle``: loop over experts, every expert on every token; tests only.
- ``experts_gather``: gather each token's expert weights; reads only touched experts. Best for decode.
- ``experts_grouped``: sort tokens by expert, then ``jax.lax.ragged_dot``; dropless. For prefill/training.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MOE_IMPLS = ("auto", "oracle", "gather", "grouped")
# At or below this many tokens the gather path reads fewer weight bytes than a grouped matmul
# over all experts (one token touches one expert); measured in bench/moe_bench.py.
GATHER_MAX_TOKENS = 8


def _swiglu(h: jax.Array, ffn: int) -> jax.Array:
    return jax.nn.silu(h[..., :ffn]) * h[..., ffn:]


def _finish(y, x, idx, gate, skip_scale, num_experts):
    """Applies the gate to expert outputs and the skip route's contribution.

    y, x: [T, D]; idx, gate, skip_scale: [T].
    """
    is_skip = idx == num_experts
    y = jnp.where(is_skip[:, None], 0, y * gate[:, None].astype(y.dtype))
    return y + (skip_scale[:, None] * x).astype(y.dtype)


def experts_oracle(x, idx, gate, skip_scale, gate_up, down):
    """Loop over experts: ``[T, D] -> [T, D]``. Reference for tests."""
    num_experts, _, two_f = gate_up.shape
    y = jnp.zeros_like(x)
    for e in range(num_experts):
        out = _swiglu(x @ gate_up[e], two_f // 2) @ down[e]
        y = y + jnp.where((idx == e)[:, None], out, 0)
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def experts_gather(x, idx, gate, skip_scale, gate_up, down):
    """Per-token weight gather: ``[T, D] -> [T, D]``; reads ``T`` experts' weights at most."""
    num_experts, _, two_f = gate_up.shape
    safe = jnp.minimum(idx, num_experts - 1)
    h = jnp.einsum("td,tdf->tf", x, gate_up[safe])
    y = jnp.einsum("tf,tfd->td", _swiglu(h, two_f // 2), down[safe])
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def experts_grouped(x, idx, gate, skip_scale, gate_up, down):
    """Sort by expert + ``ragged_dot`` grouped matmul: ``[T, D] -> [T, D]``; dropless.

    Skip-route tokens (``idx == E``) sort last and fall outside every group.
    """
    num_experts, _, two_f = gate_up.shape
    order = jnp.argsort(idx, stable=True)
    xs = x[order]
    sizes = jnp.bincount(idx, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    h = jax.lax.ragged_dot(xs, gate_up, sizes)
    ys = jax.lax.ragged_dot(_swiglu(h, two_f // 2), down, sizes)
    # Rows past the last group (skip-route tokens) are not defined by ragged_dot: zero them.
    in_group = jnp.arange(x.shape[0]) < jnp.sum(sizes)
    ys = jnp.where(in_group[:, None], ys, 0)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def experts(x, idx, gate, skip_scale, gate_up, down, impl: str = "auto"):
    """Dispatches to one implementation; ``auto`` picks by the (static) token count."""
    if impl == "auto":
        impl = "gather" if x.shape[0] <= GATHER_MAX_TOKENS else "grouped"
    fn = {"oracle": experts_oracle, "gather": experts_gather, "grouped": experts_grouped}.get(impl)
    if fn is None:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS}")
    return fn(x, idx, gate, skip_scale, gate_up, down)
