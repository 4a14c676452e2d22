"""The train step: a pure function ``(TrainState, batch) -> (TrainState, metrics)``.

The optimizer (optax AdamW, warmup + cosine decay, global-norm clipping, weight decay only on matrices)
sees the trainable params only; the router's balancing biases live beside them in the state and move
by the sign rule of ``balance.update_biases``. Master weights are float32; the forward may run in
bfloat16. Gradients are accumulated over ``grad_accum`` micro-batches with ``lax.scan`` and divided once
by the number of target tokens of the whole batch, so the loss is the mean over all of its targets.
The objective is next-token cross-entropy by default; RL passes its own (``grpo.GRPOObjective``) and
reuses everything else.

Shapes: B batch, S sequence, L layers, E experts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from zaya_jax import backend, dtypes, moe
from zaya_jax import model as zmodel
from zaya_jax.config import ZayaConfig
from zaya_jax.validate import InputError, check_range, is_integer, validate_ids

from . import balance, loss

COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation hyper-parameters; frozen and hashable (a static argument of the compiled step)."""

    learning_rate: float = 1e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    final_lr_ratio: float = 0.1  # the cosine decays to learning_rate * final_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    grad_accum: int = 1
    remat_policy: str = "none"  # see zaya_jax.model.REMAT_POLICIES
    compute_dtype: str = "float32"
    bias_rate: float = 1e-3  # sign-rule step of the balancing biases; 0 freezes them
    loss_chunk: int | None = None  # tokens per loss chunk; None: loss.default_chunk
    moe_impl: str = "auto"

    def __post_init__(self):
        floats = ("learning_rate", "final_lr_ratio", "weight_decay", "b1", "b2", "eps", "clip_norm", "bias_rate")
        bad = [f"{k}={getattr(self, k)}" for k in floats if not math.isfinite(getattr(self, k))]
        if bad:  # a NaN compares False to every bound below, and would train a NaN model
            raise ValueError(f"{', '.join(bad)}: must be finite")
        ints = ("warmup_steps", "total_steps", "grad_accum") + (("loss_chunk",) if self.loss_chunk is not None else ())
        bad = [f"{k}={getattr(self, k)!r}" for k in ints if not is_integer(getattr(self, k))]
        if bad:
            raise ValueError(f"{', '.join(bad)}: must be integers")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0):  # Adam's moments and its divisor
            raise ValueError(f"b1 and b2 must be in [0, 1) and eps > 0, got b1={self.b1}, b2={self.b2}, eps={self.eps}")
        if self.moe_impl not in moe.MOE_IMPLS:
            raise ValueError(f"moe_impl must be one of {moe.MOE_IMPLS}, got {self.moe_impl!r}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in [0, total_steps={self.total_steps})")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.remat_policy not in zmodel.REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {tuple(zmodel.REMAT_POLICIES)}, got {self.remat_policy!r}")
        if self.learning_rate < 0 or self.bias_rate < 0 or self.weight_decay < 0:
            raise ValueError("learning_rate, bias_rate and weight_decay must be >= 0")
        if not 0 <= self.final_lr_ratio <= 1:  # below 0 the schedule's learning rate turns negative: ascent
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if not self.clip_norm > 0:  # a negative clip flips every gradient
            raise ValueError(f"clip_norm must be > 0, got {self.clip_norm}")
        if self.loss_chunk is not None and self.loss_chunk < 1:
            raise ValueError(f"loss_chunk must be >= 1, got {self.loss_chunk}")


@flax.struct.dataclass
class TrainState:
    """step [] int32; params: trainable float32 params (no balancing biases); opt_state: optax state
    over ``params``; biases [L, E+1] float32."""

    step: jax.Array
    params: dict
    opt_state: Any
    biases: jax.Array


def schedule(tcfg: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to ``learning_rate``, then cosine decay to ``learning_rate * final_lr_ratio``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tcfg.learning_rate, warmup_steps=tcfg.warmup_steps,
        decay_steps=tcfg.total_steps, end_value=tcfg.learning_rate * tcfg.final_lr_ratio)


def decay_mask(params: dict) -> dict:
    """True for matrices (embedding, kernels, experts, convolutions); False for norms, biases, scales and
    key temperatures. A leaf under ``layers`` has one leading stacked axis that does not count."""
    def is_matrix(path, leaf):
        stacked = getattr(path[0], "key", None) == "layers"
        return leaf.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(tcfg.clip_norm),
        optax.adamw(schedule(tcfg), b1=tcfg.b1, b2=tcfg.b2, eps=tcfg.eps, weight_decay=tcfg.weight_decay,
                    mask=decay_mask),
    )


def init_state(params: dict, tcfg: TrainConfig) -> TrainState:
    """A fresh state from full model params (any dtype): float32 master weights, biases split out.

    The state may share buffers with ``params``; the compiled step donates them.
    """
    trainable, biases = balance.split_biases(zmodel.cast_params(params, jnp.float32))
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      opt_state=optimizer(tcfg).init(trainable), biases=biases)


def full_params(state: TrainState) -> dict:
    """The model params of a state (biases merged back), float32."""
    return balance.merge_biases(state.params, state.biases)


def cross_entropy(params, config: ZayaConfig, batch: dict, tcfg: TrainConfig):
    """The default objective: next-token CE over ``batch``'s targets (``loss.masked_ce_sum``).

    An objective maps (params, config, micro-batch, tcfg) to (sum over tokens, (token count [],
    route_counts [L, E+1], extras)); extras is a dict of [] float32 sums the step reports divided by the
    count, or maxima for keys starting with ``max_``.
    """
    total, (count, counts) = loss.masked_ce_sum(params, config, batch, chunk=tcfg.loss_chunk, moe_impl=tcfg.moe_impl,
                                                remat_policy=tcfg.remat_policy)
    return total, (count, counts, {})


def train_step(state: TrainState, batch: dict, *, config: ZayaConfig, tcfg: TrainConfig, objective=cross_entropy):
    """One optimisation step over ``batch`` (``tokens``, ``mask``, ``loss_mask``: [B, S], and whatever else
    ``objective`` reads; B divisible by ``grad_accum``). Returns (new state, metrics of the step taken:
    loss, grad_norm (before clipping), lr, target_tokens, tokens, route_counts [L, E+1],
    balance.load_metrics and the objective's extras)."""
    accum = tcfg.grad_accum
    micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
    dtype = dtypes.resolve(tcfg.compute_dtype)

    def loss_of(trainable, mb):
        p = zmodel.cast_params(balance.merge_biases(trainable, state.biases), dtype)
        return objective(p, config, mb, tcfg)

    grad_fn = jax.value_and_grad(loss_of, has_aux=True)

    def combine(k, a, b):
        return jnp.maximum(a, b) if k.startswith("max_") else a + b

    def accumulate(carry, mb):
        grads, total, count, counts, extras = carry
        (s, (c, rc, ex)), g = grad_fn(state.params, mb)
        extras = {k: combine(k, extras[k], ex[k]) for k in extras}
        return (jax.tree.map(jnp.add, grads, g), total + s, count + c, counts + rc, extras), None

    L, C = state.biases.shape
    shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro))[0][1][2]
    extras = {k: jnp.full((), -jnp.inf if k.startswith("max_") else 0.0, jnp.float32) for k in shapes}
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
            jnp.zeros((L, C), jnp.int32), extras)
    (grads, total, count, counts, extras), _ = jax.lax.scan(accumulate, init, micro, unroll=backend.scan_unroll())
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)

    updates, opt_state = optimizer(tcfg).update(grads, state.opt_state, state.params)
    new_state = TrainState(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        opt_state=opt_state,
        biases=balance.update_biases(state.biases, counts, tcfg.bias_rate),
    )
    metrics = {
        "loss": total / denom,
        "grad_norm": optax.tree.norm(grads),
        "lr": schedule(tcfg)(state.step),
        "target_tokens": count,
        "tokens": jnp.sum(batch["mask"]),
        "route_counts": counts,
        **balance.load_metrics(counts),
        **{k: v if k.startswith("max_") else v / denom for k, v in extras.items()},
    }
    return new_state, metrics


def make_train_step(config: ZayaConfig, tcfg: TrainConfig, *, state_sharding=None, batch_sharding=None,
                    metrics_sharding=None, objective=cross_entropy):
    """``train_step`` compiled once (for ``objective``: see ``cross_entropy``), with the input state donated.

    With a mesh, pass the ``TrainState`` sharding (``state_shardings``), the batch sharding (one
    ``NamedSharding`` for every batch leaf, or a dict) and a replicated sharding for the metrics; the
    step then runs under the mesh unchanged.
    """
    fn = functools.partial(train_step, config=config, tcfg=tcfg, objective=objective)
    if state_sharding is None:
        jitted = jax.jit(fn, donate_argnums=0)
    else:
        jitted = jax.jit(fn, donate_argnums=0, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, metrics_sharding))

    def checked_step(state: TrainState, batch: dict):
        check_batch(batch, config, tcfg.grad_accum)
        return jitted(state, batch)

    return checked_step


def check_batch(batch: dict, config: ZayaConfig, grad_accum: int = 1) -> None:
    """Refuses (``InputError`` naming the value) a batch the step would train on wrongly without a word: token
    ids outside the vocabulary (the embedding gather clamps them), rows beyond the context, ``mask`` /
    ``loss_mask`` not of 0/1 (a 2 counts a target twice), rows not divisible into ``grad_accum`` micro-batches.
    Tracers and arrays spanning other processes are checked for shape only (``validate``)."""
    tokens = batch["tokens"]
    validate_ids(tokens, config, batch["mask"])
    if tuple(batch["loss_mask"].shape) != tuple(tokens.shape):
        raise InputError(f"loss_mask shape {tuple(batch['loss_mask'].shape)} != tokens shape {tuple(tokens.shape)}")
    check_range(batch["loss_mask"], "loss_mask", 0, 2, "is not 0 or 1")
    if tokens.shape[0] % grad_accum:
        raise InputError(f"a batch of {tokens.shape[0]} rows does not split into grad_accum={grad_accum} micro-batches")


def state_shardings(state: TrainState, param_sharding: dict, replicated, tcfg: TrainConfig) -> TrainState:
    """The ``TrainState`` sharding for full-model param shardings ``param_sharding`` (a params-shaped tree
    of shardings, biases included): optimizer moments follow their params, scalars are ``replicated``.

    ``state`` may be abstract (``jax.eval_shape(init_state, ...)``).
    """
    trainable, biases = balance.split_biases(param_sharding)
    opt = optax.tree_map_params(optimizer(tcfg), lambda _, s: s, state.opt_state, trainable,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=trainable, opt_state=opt, biases=biases)
