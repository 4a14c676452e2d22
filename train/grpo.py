"""GRPO: group-relative advantages and the clipped token-level policy-gradient objective.

For each prompt, G rollouts are sampled from the current policy and scored by a verifier. A rollout's
advantage is its reward minus its group's mean, divided by the group's standard deviation (zero when
the group's rewards all tie: nothing to learn from it). The objective (PPO's clipped surrogate per
rollout token, the ratio taken against the log-probs the rollout was sampled with, plus an optional
KL penalty to a frozen reference by the k3 estimator) plugs into ``step.train_step``, which does the
rest as for SFT: AdamW, clipping, accumulation, remat, balancing biases, shardings.

Shapes: B rollouts (G per prompt), S tokens, L layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.config import ZayaConfig

from . import loss


def group_advantages(rewards, group: int, eps: float = 1e-6) -> np.ndarray:
    """``(r - mean) / std`` within each group of ``group`` consecutive rollouts; 0 where a group ties.

    rewards: [B] with B a multiple of ``group``. Returns [B] float32.
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 1 or r.size % group:
        raise ValueError(f"rewards must be a flat array of whole groups of {group}, got shape {r.shape}")
    g = r.reshape(-1, group)
    std = g.std(axis=1, keepdims=True)
    adv = np.where(std > eps, (g - g.mean(axis=1, keepdims=True)) / np.maximum(std, eps), 0.0)
    return adv.reshape(-1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class GRPOObjective:
    """The clipped policy-gradient objective (a ``step.train_step`` objective; frozen, so hashable).

    Per rollout token t: ``ratio = exp(logp - old_logp)``,
    ``loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + kl_coef * k3_t`` with
    ``k3_t = exp(ref - logp) - (ref - logp) - 1``. The step sums ``loss_t`` over the rollout tokens of
    the whole (accumulated) batch and divides by their count: a token-level mean.

    The batch: ``tokens``, ``mask``, ``loss_mask`` [B, S] (loss_mask 1 on generated tokens),
    ``advantages`` [B], ``old_logprobs`` [B, S] and, with ``kl_coef``, ``ref_logprobs`` [B, S] (both in
    ``loss.next_token_logprobs``' convention: column t scores token t + 1), and, for routing replay,
    ``routes`` [B, S, L] int32.

    ``temperature`` is the rollouts' sampling temperature: the policy is ``softmax(logits / temperature)``,
    the distribution the engine sampled from and recorded ``old_logprobs`` under, so the ratio compares
    like with like (at 1.0 the plain model distribution).
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_coef: float = 0.0
    temperature: float = 1.0

    def __post_init__(self):
        if not all(math.isfinite(v) for v in dataclasses.astuple(self)):
            raise ValueError(f"clip_low, clip_high, kl_coef and temperature must be finite, got {self}")
        if self.clip_low < 0 or self.clip_high < 0 or self.kl_coef < 0:
            raise ValueError(f"clip_low, clip_high and kl_coef must be >= 0, got {self}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")

    def __call__(self, params, config: ZayaConfig, batch: dict, tcfg):
        mask = batch["mask"]
        routes = batch.get("routes")
        logp, entropy, aux = loss.next_token_logprobs(
            params, config, batch["tokens"], mask, routes=None if routes is None else routes.transpose(2, 0, 1),
            chunk=tcfg.loss_chunk, moe_impl=tcfg.moe_impl, remat_policy=tcfg.remat_policy,
            temperature=self.temperature)
        w = loss.target_weights(batch["loss_mask"], mask)
        per_token, stats = self.token_losses(logp, batch["old_logprobs"], batch["advantages"][:, None],
                                             batch.get("ref_logprobs"))
        sums = {k: jnp.sum(v * w) for k, v in stats.items()}
        sums["entropy"] = jnp.sum(entropy * w)
        # The engine's log-probs against this forward's, before any update moves the params apart.
        sums["max_logprob_gap"] = jnp.max(jnp.where(w > 0, jnp.abs(jax.lax.stop_gradient(logp) - batch["old_logprobs"]),
                                                    0.0))
        return jnp.sum(per_token * w), (jnp.sum(w), aux["route_counts"], sums)

    def token_losses(self, logp, old_logp, advantages, ref_logp=None):
        """Per-token loss and metrics (``kl``, ``clip_fraction``, ``ratio``) from log-probs of any shape."""
        ratio = jnp.exp(logp - old_logp)
        unclipped = ratio * advantages
        clipped = jnp.clip(ratio, 1.0 - self.clip_low, 1.0 + self.clip_high) * advantages
        per_token = -jnp.minimum(unclipped, clipped)
        stats = {"clip_fraction": (clipped < unclipped).astype(jnp.float32), "ratio": jax.lax.stop_gradient(ratio)}
        if self.kl_coef:
            delta = ref_logp - logp
            k3 = jnp.exp(delta) - delta - 1.0
            per_token = per_token + self.kl_coef * k3
            stats["kl"] = jax.lax.stop_gradient(k3)
        return per_token, stats

