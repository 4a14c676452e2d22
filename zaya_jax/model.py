"""ZAYA1 as Flax Linen modules over one params dict, plus the pure forward.

One decoder block = CCA attention + top-1 MoE with an MLP router. Blocks are stacked along a leading
``layers`` axis and run with ``nn.scan``, so compile time stays flat in depth. Per-layer differences
(RoPE theta, sliding window) are per-layer arrays scanned alongside the params, not Python branches.

Numerics: residual stream, router, attention softmax and RoPE in float32; matmuls in the params'
dtype. Shapes: B batch, S new tokens, T key slots, D hidden, Hq/Hkv heads, Dh head dim, R router
hidden, E experts.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from . import backend, dtypes, expert_parallel, moe, narrow, quant
from .cache import KVCache, from_bits, to_bits
from .config import ZayaConfig
from .mesh import active_mesh
from .validate import InputError, validate_ids

Array = jax.Array
# Sliding window of a full-attention layer: larger than any sequence.
FULL_WINDOW = np.iinfo(np.int32).max
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _normal(config: ZayaConfig):
    return nn.initializers.normal(stddev=config.initializer_range)


def _param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


def rms_norm(x: Array, scale: Array, eps: float, dtype) -> Array:
    """``scale * x / rms(x)``, normalised in float32; ``x`` is first rounded to ``dtype`` (as HF does)."""
    x32 = x.astype(dtype).astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(dtype) * y.astype(dtype)


def rope(x: Array, positions: Array, theta: Array, rotary_dim: int) -> Array:
    """Partial NeoX rotary embedding on the first ``rotary_dim`` dims of each head.

    x: [B, S, H, Dh]; positions: [B, S] int; theta: [] float32.
    """
    exponent = jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim
    inv_freq = 1.0 / (theta ** exponent)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, rot/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb), jnp.sin(emb)
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :rotary_dim], x32[..., rotary_dim:]
    half = rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated * sin, rest], axis=-1).astype(x.dtype)


@flax.struct.dataclass
class AttentionContext:
    """Where the new tokens sit, shared by all layers.

    positions:  [B, S] int32  RoPE positions of the new tokens
    token_valid:[B, S] bool   real (non-padding) new tokens
    q_slot:     [B, S] int32  key slot of each new token (where a cache write puts it)
    key_valid:  [B, T] bool   slots holding real tokens (before causality); with a cache, attention reads
                              its first T slots only (T may be fewer than the cache has)
    state_every: with a cache, the CCA state is also returned after every ``state_every`` new tokens
                 (0: not; see ``CCAProjection``)
    """

    positions: Array
    token_valid: Array
    q_slot: Array
    key_valid: Array
    state_every: int = flax.struct.field(pytree_node=False, default=0)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), (self.axis_name,))
        return rms_norm(x, scale, self.eps, self.dtype)


class ResidualScale(nn.Module):
    """``(h + hb) * hs + (r + rb) * rs`` in float32: the learned affine residual merge."""

    @nn.compact
    def __call__(self, h, residual):
        d = residual.shape[-1]
        hs = _param(self, "hidden_scale", nn.initializers.ones, (d,), ("embed",))
        hb = _param(self, "hidden_bias", nn.initializers.zeros, (d,), ("embed",))
        rs = _param(self, "residual_scale", nn.initializers.ones, (d,), ("embed",))
        rb = _param(self, "residual_bias", nn.initializers.zeros, (d,), ("embed",))
        f32 = jnp.float32
        return (h.astype(f32) + hb) * hs + (residual.astype(f32) + rb) * rs


class Dense(nn.Module):
    """``x @ kernel (+ bias)`` with an in-features-first kernel ``[in, out]`` (float or ``quant.QuantizedArray``)."""

    features: int
    axes: tuple[str | None, str | None]
    dtype: Any
    init: Any
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        kernel = quant.astype(_param(self, "kernel", self.init, (x.shape[-1], self.features), self.axes), self.dtype)
        rows = math.prod(x.shape[:-1])
        if narrow.use_blocks(kernel, rows):  # a decode step with bfloat16 or quantized weights on CPU
            y = narrow.blocked_matmul(x, kernel).astype(quant.result_dtype(x, kernel))
        else:
            y = quant.matmul(x, kernel)
        if self.use_bias:
            y = y + _param(self, "bias", nn.initializers.zeros, (self.features,), (self.axes[1],)).astype(self.dtype)
        return y


class CCAProjection(nn.Module):
    """CCA's q/k/v construction: projections, q/k-mean residual, causal two-stage conv, value shift."""

    config: ZayaConfig
    dtype: Any

    @nn.compact
    def __call__(self, x, token_valid, conv_state=None, v_prev=None, state_every: int = 0):
        """x: [B, S, D] normed; token_valid: [B, S]; conv_state: [B, Kc, C] raw q/k frames before ``x``
        (zeros when None); v_prev: [B, kv_dim/2] delayed-value projection of the token before ``x``.

        Returns q [B, S, Hq, Dh], k [B, S, Hkv, Dh], v [B, S, Hkv, Dh] (before q/k norm and RoPE), and
        the state after each row's valid tokens (with a state given, they are a prefix of ``x``:
        right padding): conv_state [B, Kc, C], v_prev [B, kv_dim/2]; None without a state. Last, with a
        state and ``state_every`` > 0, the states after tokens ``e``, ``2e``, ... ``S`` (e = state_every; a
        row's are its own where it has that many valid tokens): (conv [B, S // e, Kc, C], v_prev
        [B, S // e, kv_dim/2]); None otherwise. A prefix cache keeps them at its block boundaries.
        """
        c, dt = self.config, self.dtype
        B, S, _ = x.shape
        Hq, Hkv, Dh, G = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.conv_groups
        group = Hq // Hkv
        init = _normal(c)

        # Padding is zeroed before the projections, so conv and value shift see a clean zero state.
        x = x * token_valid[..., None].astype(x.dtype)
        ql = Dense(c.q_dim, ("embed", "q_dim"), dt, init, name="q_proj")(x)
        kl = Dense(c.kv_dim, ("embed", "kv_dim"), dt, init, name="k_proj")(x)
        v_cur = Dense(c.kv_dim // 2, ("embed", "kv_dim"), dt, init, name="v_current")(x)
        v_del = Dense(c.kv_dim // 2, ("embed", "kv_dim"), dt, init, name="v_delayed")(x)

        # q/k-mean residual: each query head averaged with its KV head; keys get the group mean.
        q_res = 0.5 * (ql.reshape(B, S, Hq, Dh) + jnp.repeat(kl.reshape(B, S, Hkv, Dh), group, axis=2))
        k_res = q_res.reshape(B, S, Hkv, group, Dh).mean(axis=3)

        # Causal two-stage convolution over raw [q, k] frames: pad (or past frames) -> depthwise -> grouped.
        # The pad goes in before the first conv, so its output over pad frames is the bias, as in HF.
        k0, k1, kc = c.cca_time0, c.cca_time1, c.conv_state_len
        dw = _param(self, "conv_depthwise", init, (k0, c.conv_channels), ("conv_taps", "conv_channels"))
        dw_b = _param(self, "conv_depthwise_bias", nn.initializers.zeros, (c.conv_channels,), ("conv_channels",))
        gw = _param(self, "conv_grouped", init, (k1, G, Dh, Dh), ("conv_taps", "conv_groups", None, None))
        gw_b = _param(self, "conv_grouped_bias", nn.initializers.zeros, (c.conv_channels,), ("conv_channels",))
        qk = jnp.concatenate([ql, kl], axis=-1)
        past = jnp.zeros((B, kc, c.conv_channels), dt) if conv_state is None else conv_state.astype(dt)
        frames = jnp.concatenate([past, qk], axis=1)  # [B, S + Kc, C]
        mid_len = S + k1 - 1
        mid = dw_b.astype(dt) + sum(frames[:, i : i + mid_len] * dw[i].astype(dt) for i in range(k0))
        mid = mid.reshape(B, mid_len, G, Dh)
        conv = sum(jnp.einsum("bsgi,gio->bsgo", mid[:, i : i + S], gw[i].astype(dt)) for i in range(k1))
        conv = conv + gw_b.astype(dt).reshape(G, Dh)
        q = conv[:, :, :Hq] + q_res
        k = conv[:, :, Hq:] + k_res

        # Value shift: KV head 0 reads the current token, KV head 1 the previous token's projection.
        prev = jnp.zeros((B, 1, c.kv_dim // 2), dt) if v_prev is None else v_prev.astype(dt)[:, None]
        v_shift = jnp.concatenate([prev, v_del[:, :-1]], axis=1)
        v = jnp.concatenate([v_cur, v_shift], axis=-1).reshape(B, S, Hkv, Dh)
        if conv_state is None:
            return q, k, v, None, None, None
        # Row b's state ends at its last valid token: frames n .. n + Kc - 1 of [past, qk], n = its count.
        n = jnp.sum(token_valid, axis=1).astype(jnp.int32)  # [B]
        state = jnp.take_along_axis(frames, (n[:, None] + jnp.arange(kc))[..., None], axis=1)
        last = jnp.take_along_axis(v_del, jnp.maximum(n - 1, 0)[:, None, None], axis=1)[:, 0]
        every = None
        if state_every:
            ends = range(state_every, S + 1, state_every)
            every = (jnp.stack([frames[:, m:m + kc] for m in ends], axis=1),
                     jnp.stack([v_del[:, m - 1] for m in ends], axis=1))
        return q, k, v, state, jnp.where(n[:, None] > 0, last, prev[:, 0]), every


class CCAttention(nn.Module):
    """Compressed Convolutional Attention with GQA (CCGQA)."""

    config: ZayaConfig
    dtype: Any
    cache_dtype: Any = None  # the values' dtype of the cache (KVCache.dtype); its arrays hold them as bits

    @nn.compact
    def __call__(self, x, theta, window, ctx: AttentionContext, cache: dict | None, layer=None):
        """x: [B, S, D] (normed). cache: KVCache.layer_slices() of ALL layers, or None; layer: [] int32,
        this layer's index into it.

        Returns (out [B, S, D], the cache with this layer's part updated, or None, the CCA states every
        ``ctx.state_every`` tokens in the cache's storage, or None). The whole cache rides the layer
        scan's carry and each layer writes its new tokens into it in place: passed as the scan's
        per-layer input and output instead, every layer's cache slice was copied in and out at every
        decode step.
        """
        c, dt, cdt = self.config, self.dtype, self.cache_dtype
        conv_state = from_bits(cache["conv"][layer], cdt) if cache is not None else None
        v_prev = from_bits(cache["v_prev"][layer], cdt) if cache is not None else None
        with jax.named_scope("cca_projection"):  # named scopes: an XLA profile attributes time by name
            q, k, v, conv_state, v_prev, every = CCAProjection(c, dt, name="cca")(
                x, ctx.token_valid, conv_state, v_prev, ctx.state_every)
        if every is not None:
            every = tuple(to_bits(a, cdt) for a in every)

        # L2 q/k norm to sqrt(Dh), learned per-KV-head key temperature, then partial RoPE.
        temp = _param(self, "temp", nn.initializers.zeros, (c.num_key_value_heads,), ("kv_heads",))
        q, k = qk_norm(q, k, temp, c.head_dim)
        q = rope(q.astype(dt), ctx.positions, theta, c.rotary_dim)
        k = rope(k.astype(dt), ctx.positions, theta, c.rotary_dim)

        if cache is not None:
            # Each row writes its own slots; a write past the last slot is dropped (never wraps or shifts).
            # One head_dim row per (token, head), [B, S, Hkv] index arrays: written as one [Hkv, Dh] block
            # per token instead, the TPU compiler kept the cache slots-before-heads inside the decode loop
            # and copied the whole pool into and out of that layout at every call (docs/tpu.md).
            rows = jnp.arange(x.shape[0])[:, None, None]
            heads = jnp.arange(c.num_key_value_heads)[None, None, :]
            slots = ctx.q_slot[:, :, None]
            new_cache = {
                "k": cache["k"].at[layer, rows, heads, slots].set(to_bits(k, cdt), mode="drop"),
                "v": cache["v"].at[layer, rows, heads, slots].set(to_bits(v, cdt), mode="drop"),
                "conv": cache["conv"].at[layer].set(to_bits(conv_state, cdt)),
                "v_prev": cache["v_prev"].at[layer].set(to_bits(v_prev, cdt)),
            }
            T = ctx.key_valid.shape[1]
            k, v = (from_bits(new_cache[name][layer, :, :, :T], cdt).astype(dt) for name in ("k", "v"))
        else:
            new_cache = None
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, S, Dh], the cache's layout

        out = causal_attention(q, k, v, ctx, window, cached=cache is not None)  # [B, S, Hq * Dh]
        return Dense(c.hidden_size, ("q_dim", "embed"), dt, _normal(c), name="o_proj")(out), new_cache, every


def qk_norm(q, k, temp, head_dim):
    """q, k: [B, S, H, Dh]; L2-normalised to sqrt(Dh) in float32; keys scaled by temp [Hkv]."""
    eps = jnp.finfo(q.dtype).eps
    scale = math.sqrt(head_dim)

    def l2(x):
        x = x.astype(jnp.float32)
        # max(|x|, eps) written as sqrt(max(|x|^2, eps^2)): the same value, and a finite gradient at
        # x = 0 (padding tokens of a freshly initialised model), where |x|'s gradient is 0/0.
        return x * (scale / jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps)))

    return l2(q), l2(k) * temp[None, None, :, None]


ATTENTION_BLOCK = 128  # query rows per block of a long prompt's attention (causal_attention)


def causal_attention(q, k, v, ctx: AttentionContext, window, cached: bool):
    """``attention``, skipping the keys causality masks for every query of a block when that is exact.

    A prompt of S >= 2 x ``ATTENTION_BLOCK`` tokens is split into blocks of ``ATTENTION_BLOCK`` queries;
    the block ending at query row e reads only keys [0, T - S + e). That is exact when query row j sits at
    slot <= T - S + j: always without a cache (slot = j, T = S), and with one when every row's cache has
    room for all S new tokens after its length (checked at run time; otherwise all T keys are read, as
    for short inputs). At S = T = 512 that skips 6 of the 16 query-by-key blocks (docs/benchmarks.md).

    q: [B, S, Hq, Dh]; k, v: [B, Hkv, T, Dh]. Returns [B, S, Hq * Dh].
    """
    S, T = q.shape[1], k.shape[2]
    if S < 2 * ATTENTION_BLOCK or T < S:  # short, or more new tokens than cache slots: never exact
        return attention(q, k, v, ctx, window)

    def blocked(q, k, v, ctx, window):
        outs = []
        for start in range(0, S, ATTENTION_BLOCK):
            end = min(start + ATTENTION_BLOCK, S)
            keys = T - S + end
            block = AttentionContext(positions=ctx.positions[:, start:end], token_valid=ctx.token_valid[:, start:end],
                                     q_slot=ctx.q_slot[:, start:end], key_valid=ctx.key_valid[:, :keys])
            outs.append(attention(q[:, start:end], k[:, :, :keys], v[:, :, :keys], block, window))
        return jnp.concatenate(outs, axis=1)

    if not cached:
        return blocked(q, k, v, ctx, window)
    fits = jnp.all(ctx.q_slot - jnp.arange(S, dtype=ctx.q_slot.dtype) <= T - S)
    return jax.lax.cond(fits, blocked, attention, q, k, v, ctx, window)


def attention(q, k, v, ctx: AttentionContext, window):
    """Causal GQA with an optional sliding window; softmax in float32.

    q: [B, S, Hq, Dh]; k, v: [B, Hkv, T, Dh] (the cache's layout); window: [] int32 (keys within ``window``
    slots of the query, the query included). Returns [B, S, Hq * Dh].
    """
    B, S, Hq, Dh = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Each KV head's query heads x positions as one row axis: both matmuls are then plain [rows, Dh] x
    # [T, Dh] batched over (B, Hkv), with keys the minor axis of the logits. (Left to itself, XLA:CPU put
    # the keys major and transposed the logits twice: 2x slower at S = 512.)
    qg = q.reshape(B, S, Hkv, G, Dh).transpose(0, 2, 3, 1, 4).reshape(B, Hkv, G * S, Dh)
    logits = jnp.einsum("bkmd,bktd->bkmt", qg, k, preferred_element_type=jnp.float32) / math.sqrt(Dh)
    distance = ctx.q_slot[:, :, None] - jnp.arange(T)[None, None, :]  # [B, S, T]
    allowed = (distance >= 0) & (distance < window)
    mask = allowed & ctx.key_valid[:, None, :]  # [B, S, T]
    # A fully masked row (a padding query) gets uniform weights rather than NaN.
    logits = jnp.where(mask[:, None, None], logits.reshape(B, Hkv, G, S, T), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(B, Hkv, G * S, T)
    out = jnp.einsum("bkmt,bktd->bkmd", probs, v).reshape(B, Hkv, G, S, Dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, S, Hq * Dh)


class Router(nn.Module):
    """MLP router with exponential depth averaging (EDA); float32 throughout.

    Returns (route [N] int32 in [0, E], gate [N] float32 unbiased prob of the route, next state [N, R]).
    ``replay`` (same shape as the route, int32): take these routes instead of choosing (routing replay
    in RL: the training forward follows the rollout's routing), where >= 0; -1 leaves the choice to
    the router. The gate is still this router's (differentiable) probability of the route taken.
    """

    config: ZayaConfig

    @nn.compact
    def __call__(self, x, prev_state, replay=None):
        c = self.config
        f32 = jnp.float32
        init = _normal(c)
        R, C = c.router_hidden_size, c.num_router_classes
        h = Dense(R, ("embed", "router"), f32, init, use_bias=True, name="down")(x.astype(f32))
        # Layer 0 receives a zero state, so a scale of ones there is exact.
        h = h + prev_state * _param(self, "state_scale", nn.initializers.ones, (R,), ("router",))
        z = RMSNorm(c.rms_norm_eps, f32, axis_name="router", name="norm")(h)
        z = jax.nn.gelu(Dense(R, ("router", "router_out"), f32, init, use_bias=True, name="fc1")(z), approximate=False)
        z = jax.nn.gelu(Dense(R, ("router", "router_out"), f32, init, use_bias=True, name="fc2")(z), approximate=False)
        probs = jax.nn.softmax(Dense(C, ("router", "router_classes"), f32, init, name="out")(z), axis=-1)
        biases = _param(self, "balancing_biases", _balancing_init(C), (C,), ("router_classes",))
        # Biases steer the choice only; the gate is the unbiased probability.
        route = jnp.argmax(probs + biases, axis=-1).astype(jnp.int32)
        if replay is not None:
            route = jnp.where(replay >= 0, replay, route).astype(jnp.int32)
        gate = jnp.take_along_axis(probs, route[..., None], axis=-1)[..., 0]
        return route, gate, h


def _balancing_init(classes):
    def init(key, shape, dtype=jnp.float32):
        return jnp.zeros(shape, dtype).at[classes - 1].set(-1.0)

    return init


class Experts(nn.Module):
    config: ZayaConfig
    dtype: Any
    moe_impl: str = "auto"

    @nn.compact
    def __call__(self, x, route, gate, layer=None, stack=None):
        """x: [N, D]; route, gate: [N] -> [N, D].

        ``stack`` (with ``layer``): the experts' whole layer stack ``{"gate_up": [L, E, D, 2F], "down":
        [L, E, F, D]}``, given by ``apply`` for the dispatch paths that slice each token's expert straight
        out of it (``moe.STACK_IMPLS``; no copy of the layer's experts inside the scan).
        """
        c = self.config
        E, D, F = c.num_experts, c.hidden_size, c.moe_intermediate_size
        skip_scale = gate if c.mod_skip == "scaled_identity" else jnp.zeros_like(gate)
        skip_scale = jnp.where(route == E, skip_scale, 0.0)
        if stack is not None:  # the decode path: each token's expert is sliced straight out of the stack
            return moe.experts(x, route, gate, skip_scale, quant.astype(stack["gate_up"], self.dtype),
                               quant.astype(stack["down"], self.dtype), self.moe_impl, layer=layer)
        gate_up = quant.astype(_param(self, "gate_up", _normal(c), (E, D, 2 * F), ("experts", "embed", "moe_ffw")), self.dtype)
        down = quant.astype(_param(self, "down", _normal(c), (E, F, D), ("experts", "moe_ffw", "embed")), self.dtype)
        # Under a sharding mesh (jax.set_mesh) the MoE runs expert/tensor/data-parallel in a shard_map.
        if active_mesh() is not None:
            return expert_parallel.experts(x, route, gate, skip_scale, gate_up, down, self.moe_impl)
        return moe.experts(x, route, gate, skip_scale, gate_up, down, self.moe_impl)


class Block(nn.Module):
    """One ZAYA1 decoder block: CCA attention + routed MoE with learned residual merges."""

    config: ZayaConfig
    dtype: Any
    moe_impl: str = "auto"
    cache_dtype: Any = None

    @nn.compact
    def __call__(self, carry, layer_xs, ctx: AttentionContext, expert_stack=None):
        residual, router_state, cache = carry  # [B, S, D] f32, [B, S, R] f32, all layers' cache or None
        layer, theta, window, replay = layer_xs
        c, dt = self.config, self.dtype
        B, S, D = residual.shape

        x = RMSNorm(c.rms_norm_eps, dt, name="input_norm")(residual)
        with jax.named_scope("attention"):
            a, cache, states = CCAttention(c, dt, self.cache_dtype, name="attn")(x, theta, window, ctx, cache, layer)
        residual = ResidualScale(name="post_attn_scale")(a, residual)

        x = RMSNorm(c.rms_norm_eps, dt, name="post_attn_norm")(residual)
        with jax.named_scope("router"):
            route, gate, router_state = Router(c, name="router")(x, router_state, replay)
        with jax.named_scope("experts"):
            m = Experts(c, dt, self.moe_impl, name="experts")(
                x.reshape(B * S, D), route.reshape(-1), gate.reshape(-1), layer, expert_stack
            ).reshape(B, S, D)
        residual = ResidualScale(name="post_mlp_scale")(m, residual)

        # Route counts over real tokens: expert load for training metrics and bias balancing.
        counts = jnp.sum(jax.nn.one_hot(route, c.num_router_classes, dtype=jnp.int32) * ctx.token_valid[..., None], axis=(0, 1))
        return (residual, router_state, cache), (counts, route, states)


class ZayaModel(nn.Module):
    """The whole ZAYA1 causal LM.

    ``__call__(tokens [B, S], ctx, cache) -> (logits [B, S, V] f32 | hidden [B, S, D], new cache, aux)``;
    ``routes`` [L, B, S] int32 replays a recorded routing (see ``Router``).
    """

    config: ZayaConfig
    dtype: Any = jnp.float32
    moe_impl: str = "auto"
    remat_policy: str = "none"
    cache_dtype: Any = None  # KVCache.dtype when a cache is given

    @nn.compact
    def __call__(self, tokens, ctx: AttentionContext, cache: dict | None = None, return_hidden: bool = False,
                 expert_stack: dict | None = None, routes=None):
        c, dt = self.config, self.dtype
        embedding = _param(self, "embed", _embed_init(c), (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        in_scale = _param(self, "input_scale", nn.initializers.ones, (c.hidden_size,), ("embed",))
        in_bias = _param(self, "input_bias", nn.initializers.zeros, (c.hidden_size,), ("embed",))
        e = quant.dequantize(embedding[tokens], dt)
        residual = ((e + in_bias.astype(dt)) * in_scale.astype(dt)).astype(jnp.float32)
        router_state = jnp.zeros(tokens.shape + (c.router_hidden_size,), jnp.float32)

        block = Block
        if REMAT_POLICIES.get(self.remat_policy, "missing") == "missing":
            raise ValueError(f"unknown remat policy {self.remat_policy!r}; choose one of {tuple(REMAT_POLICIES)}")
        if self.remat_policy != "none":
            block = nn.remat(Block, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            unroll=backend.scan_unroll(),
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, dt, self.moe_impl, self.cache_dtype, name="layers")
        thetas, windows = layer_constants(c)
        layer_ids = jnp.arange(c.num_hidden_layers, dtype=jnp.int32)
        # Routes ride the layer scan like thetas and windows: layer-major [L, B, S].
        (residual, _, new_cache), (counts, taken, states) = layers(
            (residual, router_state, cache), (layer_ids, thetas, windows, routes), ctx, expert_stack)

        h = RMSNorm(c.rms_norm_eps, dt, name="final_norm")(residual)
        aux = {"route_counts": counts, "routes": taken}  # [layers, E + 1], [layers, B, S]
        if states is not None:  # [layers, B, S // state_every, Kc, C], [layers, B, S // state_every, kv_dim / 2]
            aux["states"] = states
        if return_hidden:
            return h, new_cache, aux
        if c.tie_word_embeddings:
            head = embedding
        else:
            head = _param(self, "lm_head", _normal(c), (c.hidden_size, c.vocab_size), ("embed", "vocab"))
        with jax.named_scope("lm_head"):
            logits = head_logits(h, head, c.tie_word_embeddings)
        return logits, new_cache, aux


def _embed_init(config: ZayaConfig):
    normal = _normal(config)

    def init(key, shape, dtype=jnp.float32):
        table = normal(key, shape, dtype)
        if config.pad_token_id is not None and 0 <= config.pad_token_id < shape[0]:
            table = table.at[config.pad_token_id].set(0.0)  # as nn.Embedding(padding_idx=...)
        return table

    return init


def layer_constants(config: ZayaConfig) -> tuple[Array, Array]:
    """Per-layer RoPE theta [L] float32 and attention window [L] int32 (FULL_WINDOW when unlimited)."""
    thetas = np.array([config.rope_theta_for(t) for t in config.layer_types], np.float32)
    windows = np.array(
        [config.sliding_window if t == "hybrid_sliding" else FULL_WINDOW for t in config.layer_types], np.int32
    )
    return jnp.asarray(thetas), jnp.asarray(windows)


def head_kernel(params: dict, config: ZayaConfig) -> Array:
    """The LM head ``[D, V]``: the transposed embedding when tied."""
    return params["embed"].T if config.tie_word_embeddings else params["lm_head"]


def head_logits(h: Array, head, tied: bool) -> Array:
    """Logits ``[..., V]`` float32 of final hidden states ``h [..., D]`` (in the compute dtype). ``head``: the
    embedding ``[V, D]`` when ``tied``, else the LM head ``[D, V]``; float or quantized.

    A quantized head on CPU is read in blocks of the vocabulary (``narrow.blocked_logits``): whole, XLA:CPU
    writes a float32 copy of it and reads it back at every call (ZAYA1-8B's int8 embedding at 4-64 decode
    rows: 0.43-0.67 s whole, 0.11-0.46 s in blocks; bench/head_bench.py). A bfloat16 head keeps XLA:CPU's
    own dot, faster than the blocks there. Under a mesh the vocabulary is split and the plain product runs.
    """
    if quant.is_quantized(head) and backend.platform() == "cpu" and active_mesh() is None:
        return narrow.blocked_logits(h, head, tied)
    return whole_head_logits(h, head, tied)


def whole_head_logits(h: Array, head, tied: bool) -> Array:
    """``head_logits`` as one product against the whole head (what runs off CPU, under a mesh, and for a
    float head)."""
    w = head.T if tied else head
    return quant.matmul(h, quant.astype(w, h.dtype), preferred_element_type=jnp.float32)


def lm_logits(params: dict, config: ZayaConfig, h: Array) -> Array:
    """``head_logits`` with the head of ``params``."""
    tied = config.tie_word_embeddings
    return head_logits(h, params["embed"] if tied else params["lm_head"], tied)


# ---------------------------------------------------------------------------------------------------
# Pure functional API over the plain params dict.


def uncached_context(attention_mask: Array) -> AttentionContext:
    """Context for a forward without cache. attention_mask: [B, S] of 1/0 (left padding is exact).

    Positions count real tokens only, so a left-padded row equals the same row unpadded.
    """
    valid = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)
    q_slot = jnp.broadcast_to(jnp.arange(attention_mask.shape[1], dtype=jnp.int32), attention_mask.shape)
    return AttentionContext(positions=positions, token_valid=valid, q_slot=q_slot, key_valid=valid)


def cached_context(cache: KVCache, num_new: int, new_len: Array | None = None, keys: int | None = None,
                   state_every: int = 0) -> AttentionContext:
    """Context for appending up to ``num_new`` tokens to each row of ``cache``.

    new_len: [B] int32 valid new tokens per row (a prefix of the ``num_new``; default all). A row with
    0 (an idle slot) computes on padding and changes nothing but slots past its length. keys: attend over
    the first ``keys`` cache slots only (default all): exact for rows that hold at most ``keys`` tokens
    once the new ones are in. state_every: see ``AttentionContext``.
    """
    B = cache.lengths.shape[0]
    offsets = jnp.arange(num_new, dtype=jnp.int32)
    new_len = jnp.full((B,), num_new, jnp.int32) if new_len is None else new_len.astype(jnp.int32)
    q_slot = cache.lengths[:, None] + offsets[None, :]  # slot = position
    token_valid = offsets[None, :] < new_len[:, None]
    key_valid = jnp.arange(cache.max_len if keys is None else keys)[None, :] < (cache.lengths + new_len)[:, None]
    return AttentionContext(positions=q_slot, token_valid=token_valid, q_slot=q_slot, key_valid=key_valid,
                            state_every=state_every)


def compute_dtype(params: dict):
    """Matmuls run in the dtype the float weights are stored in (the norms' are never quantized)."""
    return params["final_norm"]["scale"].dtype


def apply(params, config: ZayaConfig, tokens, ctx: AttentionContext, cache: KVCache | None = None, *,
          moe_impl: str = "auto", remat_policy: str = "none", return_hidden: bool = False, routes=None,
          stack_experts: bool = True):
    """Runs the model. tokens: [B, S] int32.

    ``stack_experts``: the ``moe.STACK_IMPLS`` dispatches slice each expert out of the whole layer stack
    (inference). A differentiated call passes False, so that they take each layer's weights from the
    layer scan: a gradient into the whole stack would cost a stack-sized add at every layer.

    ``routes`` [L, B, S] int32 (routing replay): every token takes these routes instead of its router's
    choice (-1: its router chooses), with the router's current probability of that route as its gate
    (the same forward as without ``routes`` when they are the routes it would choose).

    Returns (logits [B, S, V] float32 — or final hidden [B, S, D] with ``return_hidden`` —, the updated
    KVCache or None, aux {"route_counts": [L, E + 1], "routes": [L, B, S] int32 (the routes taken)}).
    """
    model = ZayaModel(config, compute_dtype(params), moe_impl, remat_policy, cache.dtype if cache is not None else None)
    layer_cache = cache.layer_slices() if cache is not None else None
    # The CPU decode paths slice experts out of the stacked weights (read from the params given, so the
    # gradient stays exact); never under a mesh, where the expert-parallel shard_map runs instead.
    stack = None
    if stack_experts and active_mesh() is None and moe.resolve_impl(moe_impl, tokens.size) in moe.STACK_IMPLS:
        stack = params["layers"]["experts"]
    out, new_layers, aux = model.apply({"params": params}, tokens, ctx, layer_cache, return_hidden, stack, routes)
    new_cache = None
    if cache is not None:
        new_cache = cache.replace(lengths=cache.lengths + jnp.sum(ctx.token_valid, axis=1, dtype=jnp.int32), **new_layers)
    return out, new_cache, aux


def forward(params, config: ZayaConfig, input_ids, attention_mask=None, *, moe_impl: str = "auto") -> Array:
    """Logits ``[B, S, V]`` float32 for ``input_ids [B, S]``; ``attention_mask [B, S]`` is 1/0, left-padded.

    Raises ``zaya_jax.InputError`` (see ``zaya_jax.validate``) for ids outside the vocabulary, non-integer
    or empty inputs, rows longer than ``max_position_embeddings`` or a mask that is not 1/0 of that shape.
    """
    input_ids, attention_mask = validate_ids(input_ids, config, attention_mask)
    if moe_impl not in moe.MOE_IMPLS:
        raise InputError(f"unknown moe_impl {moe_impl!r}; choose one of {moe.MOE_IMPLS}")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    return _forward_jit(params, config, input_ids, jnp.asarray(attention_mask, jnp.int32), moe_impl)


# Compiler options of the inference programs. XLA:CPU runs bfloat16 dots by converting their operands to
# float32; the weights are loop-invariant in the layer scan (and in the decode loop), so while-loop-
# invariant code motion hoists those converts out of the loops and builds a float32 copy of every
# weight first (33 GB of temporaries for a ZAYA1-8B prefill, 8 GB even at 2 layers). Without the pass
# the converts stay fused into each layer's reads (temporaries: ~50 MB); nothing else is worth hoisting.
INFERENCE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


@jax.jit(static_argnums=(1, 4), compiler_options=INFERENCE_COMPILER_OPTIONS)
def _forward_jit(params, config, input_ids, attention_mask, moe_impl):
    logits, _, _ = apply(params, config, input_ids, uncached_context(attention_mask), moe_impl=moe_impl)
    return logits


def _boxed_init(config: ZayaConfig, key):
    tokens = jnp.zeros((1, 1), jnp.int32)
    ctx = uncached_context(jnp.ones((1, 1), jnp.int32))
    return ZayaModel(config, jnp.float32).init(key, tokens, ctx)["params"]


def init(config: ZayaConfig, key, dtype=jnp.float32) -> dict:
    """Random params with the reference's distributions; ``balancing_biases`` stay float32."""
    params = nn.meta.unbox(jax.jit(_boxed_init, static_argnums=0)(config, key))
    return cast_params(params, dtype)


def cast_params(params: dict, dtype) -> dict:
    """Casts every float leaf to ``dtype`` except those that stay float32 (``zaya_jax.dtypes``); quantized
    leaves stay as they are."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: quant.astype(leaf, dtypes.leaf_dtype(path, dtype)), params, is_leaf=quant.is_quantized)


def logical_axes(config: ZayaConfig) -> dict:
    """A pytree like the params whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(config, jax.random.key(0))))
