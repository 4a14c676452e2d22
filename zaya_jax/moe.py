"""Top-1 expert dispatch: one signature, several implementations, one oracle.

Every implementation computes, for tokens ``x [T, D]`` routed to ``idx [T]`` with gate ``gate [T]``::

    y[t] = gate[t] * down[idx[t]]( silu(gu[:F]) * gu[F:] ),   gu = x[t] @ gate_up[idx[t]]

with ``gate_up [E, D, 2F]`` (gate columns first) and ``down [E, F, D]``. Tokens with ``idx == E`` took
the router's skip route and get ``skip_scale[t] * x[t]`` (zero for the native behaviour).

- ``experts_oracle``: loop over experts, every expert on every token; tests only.
- ``experts_gather``: gather each token's expert weights; reads only touched experts. Best for decode.
- ``experts_grouped``: sort tokens by expert, then ``jax.lax.ragged_dot``; dropless.
- ``experts_tiled``: sort tokens by expert into fixed-size one-expert tiles, scan over tiles; dropless.
- ``experts_sorted``: sort tokens by expert, then each touched expert once on its rows, padded to a
  bucket of at most 1.5x (one loop per bucket size); every touched expert's weights are read once.
- ``experts_loop``: one token at a time, slicing its expert out of the whole layer stack. For decode.
- ``experts_dense``: every expert on every token, other experts' rows zeroed between the two matmuls;
  each expert's weights read once, in place, at E x the FLOPs. For decode on a TPU.

``impl="auto"`` chooses by backend, token count and whether the call is differentiated (training),
from measurements (``python bench/moe_bench.py [--grad]``; figures and the reasons in
docs/benchmarks.md and docs/architecture.md). XLA:CPU: inference ``loop`` for a few tokens, then
``sorted`` (1.3-4.8x faster than ``tiled`` from 16 to 8192 tokens); training ``loop`` for a few
tokens, then ``sorted`` on each layer's weights (``model.apply(stack_experts=False)``; forward + backward
1.05-1.35x faster than ``tiled`` from 256 to 2048 tokens).
TPU, from the compiled programs' costs (``python bench/tpu_choices.py moe``, docs/tpu.md): ``dense`` for
decode-sized calls where it reads fewer bytes than ``grouped`` (whose ``ragged_dot`` needs each layer's
expert weights copied out of the stack first), ``gather`` for a few tokens over many experts, ``grouped``
otherwise. Other accelerators: ``gather`` for decode, ``grouped`` otherwise (not measured there).

The expert weights may be quantized (``zaya_jax.quant``): every path indexes them as it indexes float
ones and multiplies through ``quant.matmul`` (the differentiated paths' backward needs float weights).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import backend, narrow, quant

MOE_IMPLS = ("auto", "oracle", "gather", "loop", "grouped", "tiled", "sorted", "dense")
# XLA:CPU thresholds in tokens per call (bench/moe_bench.py, see above).
LOOP_MAX_TOKENS_CPU = 4
TRAIN_LOOP_MAX_TOKENS_CPU = 16
GATHER_MAX_TOKENS = 8
# TPU: ``dense`` up to this many tokens per call. Its arithmetic intensity is the token count in FLOPs per
# weight byte: up to a chip's ridge point (v5p 166, v4 224, v5e 240, v6e 560 FLOP/byte) it is bound by
# reading each weight once, and past it its time grows with the tokens; ``grouped`` reads the touched
# experts' weights GROUPED_READS times. So ``dense`` is the faster below GROUPED_READS x the ridge (v5p: 498
# tokens), and 256 keeps a factor of 2 from that on every chip. ZAYA1-8B's decode step at 256 slots x 2048
# (docs/tpu.md): 12.6 ms against grouped's 23.2 on v5e-8, 4.0 against 8.3 on v5p-8.
DENSE_MAX_TOKENS = 256
# What ``grouped`` reads of each touched expert's weights, in a layer scan: the copy out of the stack
# (read + write), then the grouped matmul's read (the TPU program's HLO; docs/tpu.md).
GROUPED_READS = 3
# Implementations that can take the whole layer stack ``[L, E, ...]`` and a layer index.
STACK_IMPLS = ("loop", "sorted")


def _swiglu(h: jax.Array, ffn: int) -> jax.Array:
    return jax.nn.silu(h[..., :ffn]) * h[..., ffn:]


def _activation(act, two_f: int):
    """The SwiGLU ``[.., 2F] -> [.., F]`` unless ``act`` replaces it (tensor parallelism does)."""
    return act if act is not None else (lambda h: _swiglu(h, two_f // 2))


def add_skip(y, x, skip_scale):
    """``y + skip_scale * x``: the skip route's contribution. y, x: [T, D]; skip_scale: [T]."""
    return y + (skip_scale[:, None] * x).astype(y.dtype)


def _finish(y, x, idx, gate, skip_scale, num_experts):
    """Applies the gate to expert outputs and the skip route's contribution.

    y, x: [T, D]; idx, gate, skip_scale: [T].
    """
    is_skip = idx == num_experts
    y = jnp.where(is_skip[:, None], 0, y * gate[:, None].astype(y.dtype))
    return add_skip(y, x, skip_scale)


def experts_oracle(x, idx, gate, skip_scale, gate_up, down, act=None):
    """Loop over experts: ``[T, D] -> [T, D]``. Reference for tests."""
    num_experts, _, two_f = gate_up.shape
    act = _activation(act, two_f)
    y = jnp.zeros_like(x)
    for e in range(num_experts):
        out = quant.matmul(act(quant.matmul(x, gate_up[e])), down[e])
        y = y + jnp.where((idx == e)[:, None], out, 0)
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def experts_gather(x, idx, gate, skip_scale, gate_up, down, act=None):
    """Per-token weight gather: ``[T, D] -> [T, D]``; reads ``T`` experts' weights at most."""
    num_experts, _, two_f = gate_up.shape
    safe = jnp.minimum(idx, num_experts - 1)
    h = quant.matmul(x[:, None], gate_up[safe])[:, 0]
    y = quant.matmul(_activation(act, two_f)(h)[:, None], down[safe])[:, 0]
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def _expert_weights(gate_up, down, e, layer=None):
    """Expert ``e``'s ``gate_up [D, 2F]`` and ``down [F, D]``, sliced straight out of the weights; with
    ``layer``, the weights are the whole layer stack and the slice is taken at ``(layer, e)``."""
    prefix = () if layer is None else (layer,)
    lead = (1,) * (len(prefix) + 1)
    def take(a):
        return jax.lax.dynamic_slice(a, prefix + (e, 0, 0), lead + a.shape[-2:]).reshape(a.shape[-2:])

    return jax.tree.map(take, gate_up), jax.tree.map(take, down)


def experts_loop(x, idx, gate, skip_scale, gate_up, down, act=None, layer=None):
    """One token at a time, each slicing its own expert's weights: ``[T, D] -> [T, D]``.

    With ``layer``, ``gate_up [L, E, D, 2F]`` and ``down [L, E, F, D]`` are the whole layer stack and
    the slice is taken at ``(layer, expert)``: inside the layer scan this reads only the touched
    experts, where a per-layer slice would first copy all of that layer's experts (bench/moe_bench.py).
    Weights narrower than float32 on CPU are read in row blocks (``narrow.blocked_matmul``).
    """
    num_experts, _, two_f = gate_up.shape[-3:]
    act = _activation(act, two_f)
    blocked = narrow.use_blocks(gate_up, 1)

    def one(args):
        xt, e = args
        if blocked:
            lead = (e,) if layer is None else (layer, e)
            h = narrow.blocked_matmul(xt, gate_up, lead).astype(xt.dtype)
            return narrow.blocked_matmul(act(h), down, lead).astype(xt.dtype)
        gu, dn = _expert_weights(gate_up, down, e, layer)
        return quant.matmul(act(quant.matmul(xt, gu)), dn)

    y = jax.lax.map(one, (x, jnp.minimum(idx, num_experts - 1)))
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def experts_grouped(x, idx, gate, skip_scale, gate_up, down, act=None):
    """Sort by expert + ``ragged_dot`` grouped matmul: ``[T, D] -> [T, D]``; dropless.

    Skip-route tokens (``idx == E``) sort last and fall outside every group.
    """
    num_experts, _, two_f = gate_up.shape
    order = jnp.argsort(idx, stable=True)
    xs = x[order]
    sizes = jnp.bincount(idx, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    row_expert = jnp.minimum(idx[order], num_experts - 1)
    h = _ragged_dot(xs, gate_up, sizes, row_expert)
    ys = _ragged_dot(_activation(act, two_f)(h), down, sizes, row_expert)
    # Rows past the last group (skip-route tokens) are not defined by ragged_dot: zero them.
    in_group = jnp.arange(x.shape[0]) < jnp.sum(sizes)
    ys = jnp.where(in_group[:, None], ys, 0)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def _ragged_dot(x, w, sizes, row_expert):
    """``jax.lax.ragged_dot`` for a float or quantized ``w [E, K, N]``; row_expert: [T] each row's expert
    (per-channel scales multiply each row's product by its expert's scales)."""
    if not quant.is_quantized(w):
        return jax.lax.ragged_dot(x, w, sizes)
    if not quant.per_channel(w):
        return jax.lax.ragged_dot(x, quant.dequantize(w, x.dtype), sizes)
    y = jax.lax.ragged_dot(x, w.values.astype(x.dtype), sizes, preferred_element_type=jnp.float32)
    return (y * w.scales[row_expert, 0]).astype(x.dtype)


def experts_dense(x, idx, gate, skip_scale, gate_up, down, act=None):
    """Every expert on every token, each token's rows of the other experts zeroed between the two
    matmuls: ``[T, D] -> [T, D]``; dropless.

    Each expert's weights are read once, straight from the layer's weights (no sort, no gather, no copy
    out of the stack as ``ragged_dot`` needs), for ``E`` times the FLOPs of the routed rows. That suits
    decode on an accelerator, whose step is bound by reading the weights while a few tokens per call leave
    its matmul units idle. Intermediates: ``[E, T, 2F]``.
    """
    num_experts, _, two_f = gate_up.shape
    h = _activation(act, two_f)(quant.matmul(x, gate_up))  # [E, T, F]
    mine = idx[None, :] == jnp.arange(num_experts)[:, None]  # [E, T]
    y = quant.matmul(jnp.where(mine[..., None], h, 0), down).sum(axis=0)  # one nonzero term per row: exact
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def dense_reads_less(tokens: int, num_experts: int) -> bool:
    """Whether ``dense`` (every expert's weights once) reads fewer weight bytes than ``grouped`` would
    (``GROUPED_READS`` x the experts ``tokens`` uniformly routed tokens are expected to touch)."""
    touched = num_experts * (1 - (1 - 1 / num_experts) ** tokens)
    return num_experts <= GROUPED_READS * touched


def tile_size(tokens: int, num_experts: int) -> int:
    """Rows per tile: about half an expert's even share, a power of two in [16, 128] (measured on CPU)."""
    share = max(1, tokens // (2 * num_experts))
    return int(min(128, max(16, 1 << (share - 1).bit_length())))


def experts_tiled(x, idx, gate, skip_scale, gate_up, down, act=None, tile: int | None = None):
    """Sort by expert into fixed-size tiles of one expert each, then scan over tiles: ``[T, D] -> [T, D]``.

    Each expert's tokens are padded up to a multiple of ``tile``, so at most ``ceil(T / tile) + E``
    tiles exist (a static bound); each scan step reads one expert's weights. Pure JAX, dropless.
    """
    T, D = x.shape
    num_experts, _, two_f = gate_up.shape
    act = _activation(act, two_f)
    tile = max(1, min(tile or tile_size(T, num_experts), T))
    order = jnp.argsort(idx, stable=True)
    sorted_idx = idx[order]
    sizes = jnp.bincount(idx, length=num_experts + 1)[:num_experts]
    padded = (sizes + tile - 1) // tile * tile
    padded_start = jnp.cumsum(padded) - padded  # [E] first padded row of each expert
    group_start = jnp.cumsum(sizes) - sizes
    # Row of each sorted token in the padded buffer; skip-route tokens go to a dropped row.
    safe_idx = jnp.minimum(sorted_idx, num_experts - 1)
    rank = jnp.arange(T) - group_start[safe_idx]
    num_tiles = -(-T // tile) + num_experts
    rows = num_tiles * tile
    dest = jnp.where(sorted_idx < num_experts, padded_start[safe_idx] + rank, rows)
    buf = jnp.zeros((rows, D), x.dtype).at[dest].set(x[order], mode="drop")
    # Expert of each tile: the last expert whose padded range starts at or before the tile.
    tile_start = jnp.arange(num_tiles) * tile
    tile_expert = jnp.clip(jnp.searchsorted(padded_start + padded, tile_start, side="right"), 0, num_experts - 1)
    tile_used = tile_start < jnp.sum(padded)

    out = _tile_scan(act, buf.reshape(num_tiles, tile, D), tile_expert, tile_used, gate_up, down).reshape(rows, D)
    ys = jnp.where((sorted_idx < num_experts)[:, None], out[jnp.minimum(dest, rows - 1)], 0)
    y = jnp.zeros_like(ys).at[order].set(ys)
    return _finish(y, x, idx, gate, skip_scale, num_experts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _tile_scan(act, tiles, tile_expert, tile_used, gate_up, down):
    """``act(tiles[i] @ gate_up[e_i]) @ down[e_i]`` per used tile, zeros for unused ones.

    tiles: [N, tile, D]; tile_expert: [N] int; tile_used: [N] bool -> [N, tile, D]. The custom backward
    recomputes each tile and adds its weight gradients into the ``[E, ...]`` accumulators in place;
    plain autodiff of the scan added a full-size ``[E, D, 2F]`` cotangent per tile (bench/moe_bench.py
    --grad: several times slower).
    """

    def step(_, xs):
        x_tile, e, used = xs
        return None, jax.lax.cond(used, lambda x: quant.matmul(act(quant.matmul(x, gate_up[e])), down[e]),
                                  jnp.zeros_like, x_tile)

    return jax.lax.scan(step, None, (tiles, tile_expert, tile_used), unroll=backend.scan_unroll())[1]


def _tile_scan_fwd(act, tiles, tile_expert, tile_used, gate_up, down):
    return _tile_scan(act, tiles, tile_expert, tile_used, gate_up, down), (tiles, tile_expert, tile_used, gate_up, down)


def _tile_scan_bwd(act, residuals, d_out):
    tiles, tile_expert, tile_used, gate_up, down = residuals

    def step(grads, xs):
        x_tile, e, used, dy = xs

        def run(grads):
            d_gate_up, d_down = grads
            gu, dn = gate_up[e], down[e]
            a, act_vjp = jax.vjp(act, x_tile @ gu)
            (d_h,) = act_vjp(dy @ dn.T)
            grads = (_add_at(d_gate_up, (e,), x_tile.T @ d_h), _add_at(d_down, (e,), a.T @ dy))
            return grads, d_h @ gu.T

        return jax.lax.cond(used, run, lambda g: (g, jnp.zeros_like(x_tile)), grads)

    init = (jnp.zeros_like(gate_up), jnp.zeros_like(down))
    (d_gate_up, d_down), d_tiles = jax.lax.scan(step, init, (tiles, tile_expert, tile_used, d_out),
                                                unroll=backend.scan_unroll())
    return d_tiles, None, None, d_gate_up, d_down


_tile_scan.defvjp(_tile_scan_fwd, _tile_scan_bwd)


def _add_at(acc, index, value):
    """``acc[index] += value`` for a tuple of leading ``index``es, in place inside a loop."""
    start = tuple(index) + (0,) * value.ndim
    shape = (1,) * len(index) + value.shape
    return jax.lax.dynamic_update_slice(acc, jax.lax.dynamic_slice(acc, start, shape) + value.reshape(shape), start)


def capacity_buckets(tokens: int) -> tuple[int, ...]:
    """Row counts an expert's group is padded to in ``experts_sorted``, up to the first >= ``tokens``: 0, 1, 2,
    then each power of two p >= 4 and 1.5 p (4, 6, 8, 12, 16, 24, ...), so a group is padded by at most 1.5x.

    Powers of two alone padded by up to 2x: 37% more expert rows than tokens in a 512-token prefill of
    bench-124M (its routing at ``init``), 18% with the steps between (docs/benchmarks.md).
    """
    sizes, p = [0, 1, 2], 4
    while sizes[-1] < tokens:
        sizes += [p, 3 * p // 2]
        p *= 2
    return tuple(sizes[: next(i for i, n in enumerate(sizes) if n >= tokens) + 1])


def experts_sorted(x, idx, gate, skip_scale, gate_up, down, act=None, layer=None):
    """Sort by expert, then run each touched expert once on its rows: ``[T, D] -> [T, D]``; dropless.

    Expert ``e``'s rows are contiguous after the sort and padded to the smallest bucket of
    ``capacity_buckets(T)`` that holds them (at most 1.5x), so every touched expert's weights are read
    exactly once and untouched experts cost nothing. With ``layer``, the weights are the whole layer
    stack (``[L, E, ...]``) and each expert is sliced at ``(layer, e)`` (no copy of the layer's experts).
    """
    T, D = x.shape
    num_experts = gate_up.shape[-3]
    buckets = capacity_buckets(T)
    order = jnp.argsort(idx, stable=True)
    sizes = jnp.bincount(idx, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    # A static tail of zero rows, so every bucket-sized slice stays in bounds (no clamping).
    xs = jnp.concatenate([x[order], jnp.zeros((buckets[-1], D), x.dtype)])
    ys = _expert_groups(_activation(act, gate_up.shape[-1]), buckets, xs, sizes, gate_up, down, layer)
    y = ys[jnp.argsort(order)]  # back to token order; skip-route rows are zeroed by _finish
    return _finish(y, x, idx, gate, skip_scale, num_experts)


def _for_each_group(buckets, sizes, body, carry):
    """``carry = body(rows, e, start, size, carry)`` for every expert ``e`` with ``size > 0`` rows starting at
    sorted row ``start``; ``rows`` is its (static) bucket. One loop per bucket over the experts padded to it:
    a ``lax.switch`` per expert instead made XLA copy the carry through every branch (docs/benchmarks.md)."""
    starts = jnp.cumsum(sizes) - sizes
    which = jnp.searchsorted(jnp.asarray(buckets, jnp.int32), sizes, side="left")  # [E] bucket of each expert
    by_bucket = jnp.argsort(which, stable=True)
    count = jnp.bincount(which, length=len(buckets)).astype(jnp.int32)
    first = jnp.cumsum(count) - count
    for k, rows in enumerate(buckets):
        if rows:
            def step(i, carry, rows=rows):
                e = by_bucket[i]
                return body(rows, e, starts[e], sizes[e], carry)
            carry = jax.lax.fori_loop(first[k], first[k] + count[k], step, carry)
    return carry


def _write_rows(buf, value, start, size):
    """``buf[start:start + size] = value[:size]``: the bucket's padding rows write back what ``buf`` holds
    there (another expert's rows, written before or after), so the experts may run in any order."""
    rows = value.shape[0]
    keep = jax.lax.dynamic_slice_in_dim(buf, start, rows)
    value = jnp.where((jnp.arange(rows) < size)[:, None], value.astype(buf.dtype), keep)
    return jax.lax.dynamic_update_slice_in_dim(buf, value, start, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _expert_groups(act, buckets, xs, sizes, gate_up, down, layer):
    """Each expert ``e`` on its ``sizes[e]`` sorted rows of ``xs [R, D]`` -> ``[R, D]`` (rows of no expert: 0).

    The loops have run-time trip counts, which reverse-mode autodiff cannot differentiate; the custom
    backward runs the same loops, adding each expert's weight gradients in place."""

    def run(rows, e, start, size, ys):
        gu, dn = _expert_weights(gate_up, down, e, layer)
        rows_in = jax.lax.dynamic_slice_in_dim(xs, start, rows)
        return _write_rows(ys, quant.matmul(act(quant.matmul(rows_in, gu)), dn), start, size)

    return _for_each_group(buckets, sizes, run, jnp.zeros_like(xs))


def _expert_groups_fwd(act, buckets, xs, sizes, gate_up, down, layer):
    return _expert_groups(act, buckets, xs, sizes, gate_up, down, layer), (xs, sizes, gate_up, down, layer)


def _expert_groups_bwd(act, buckets, residuals, d_ys):
    xs, sizes, gate_up, down, layer = residuals
    at = () if layer is None else (layer,)

    def run(rows, e, start, size, grads):
        d_xs, d_gate_up, d_down = grads
        gu, dn = _expert_weights(gate_up, down, e, layer)
        x_rows = jax.lax.dynamic_slice_in_dim(xs, start, rows)
        dy = jnp.where((jnp.arange(rows) < size)[:, None], jax.lax.dynamic_slice_in_dim(d_ys, start, rows), 0)
        a, act_vjp = jax.vjp(act, x_rows @ gu)
        (d_h,) = act_vjp(dy @ dn.T)
        return (_write_rows(d_xs, d_h @ gu.T, start, size), _add_at(d_gate_up, at + (e,), x_rows.T @ d_h),
                _add_at(d_down, at + (e,), a.T @ dy))

    init = (jnp.zeros_like(xs), jnp.zeros_like(gate_up), jnp.zeros_like(down))
    d_xs, d_gate_up, d_down = _for_each_group(buckets, sizes, run, init)
    return d_xs, None, d_gate_up, d_down, None


_expert_groups.defvjp(_expert_groups_fwd, _expert_groups_bwd)


def auto_impl(tokens: int, platform: str | None = None, training: bool = False, num_experts: int | None = None
              ) -> str:
    """The measured-best implementation for ``tokens`` tokens per call (``training``: differentiated) over
    ``num_experts`` experts (this device's; None: unknown, as when only the token count decides)."""
    platform = platform or backend.platform()
    if (platform == "tpu" and not training and num_experts is not None and tokens <= DENSE_MAX_TOKENS
            and dense_reads_less(tokens, num_experts)):
        return "dense"
    if platform != "cpu":
        return "gather" if tokens <= GATHER_MAX_TOKENS else "grouped"
    if training:
        return "loop" if tokens <= TRAIN_LOOP_MAX_TOKENS_CPU else "sorted"
    return "loop" if tokens <= LOOP_MAX_TOKENS_CPU else "sorted"


def resolve_impl(impl: str, tokens: int, training: bool = False, num_experts: int | None = None) -> str:
    """The implementation ``impl`` names for ``tokens`` tokens (``auto`` decides by backend and count)."""
    if impl == "auto":
        return auto_impl(tokens, training=training, num_experts=num_experts)
    if impl not in MOE_IMPLS:
        raise ValueError(f"unknown MoE implementation {impl!r}; choose one of {MOE_IMPLS}")
    return impl


def experts(x, idx, gate, skip_scale, gate_up, down, impl: str = "auto", act=None, layer=None):
    """Dispatches to one implementation; ``auto`` picks by the (static) token and expert counts.

    ``act`` replaces the SwiGLU ``h [.., 2F] -> [.., F]`` between the two expert matmuls (the
    tensor-parallel path of ``expert_parallel.py`` passes one that exchanges activations). With
    ``layer``, the weights are the whole layer stack (``[L, E, ...]``) and ``layer`` picks the layer.
    """
    impl = resolve_impl(impl, x.shape[0], num_experts=gate_up.shape[-3])
    if impl in STACK_IMPLS:
        fn = experts_loop if impl == "loop" else experts_sorted
        return fn(x, idx, gate, skip_scale, gate_up, down, act=act, layer=layer)
    if layer is not None:
        gate_up, down = gate_up[layer], down[layer]
    fn = {"oracle": experts_oracle, "gather": experts_gather, "grouped": experts_grouped, "tiled": experts_tiled,
          "dense": experts_dense}[impl]
    return fn(x, idx, gate, skip_scale, gate_up, down, act=act)
