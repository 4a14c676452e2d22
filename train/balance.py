"""Auxiliary-loss-free expert balancing (DeepSeek-V3's sign rule) on the router's ``balancing_biases``.

The biases steer only which route a token takes, never its gate, and they are not trained by the
optimizer: after each step every real expert's bias moves by ``rate`` toward uniform load (up when the
expert got fewer tokens than the mean over real experts, down when it got more). The skip route's bias
(the last class) is left as loaded.
"""

from __future__ import annotations

import jax.numpy as jnp


def split_biases(params: dict) -> tuple[dict, jnp.ndarray]:
    """``params`` -> (trainable params without the biases, biases [L, E+1] float32). Does not copy leaves."""
    router = dict(params["layers"]["router"])
    biases = router.pop("balancing_biases")
    return {**params, "layers": {**params["layers"], "router": router}}, biases


def merge_biases(trainable: dict, biases) -> dict:
    """Inverse of ``split_biases``."""
    router = {**trainable["layers"]["router"], "balancing_biases": biases}
    return {**trainable, "layers": {**trainable["layers"], "router": router}}


def update_biases(biases, route_counts, rate: float):
    """One sign-rule step. biases: [L, E+1] float32; route_counts: [L, E+1] tokens per route (real tokens).

    Real experts (classes ``0..E-1``) move by ``rate * sign(mean_load - load)``; the skip class keeps
    its bias. A layer whose real experts got no token is left unchanged (the sign is zero).
    """
    load = route_counts[:, :-1].astype(jnp.float32)
    delta = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return biases.at[:, :-1].add(delta)


def load_metrics(route_counts) -> dict:
    """Per-layer expert load and skip share from route counts [L, E+1].

    ``expert_load`` [L, E]: each real expert's share of the tokens that went to real experts;
    ``skip_share`` [L]: share of all tokens that took the skip route;
    ``max_load_ratio`` [L]: the most-loaded expert's load over the uniform load (1 is perfect balance).
    """
    counts = route_counts.astype(jnp.float32)
    real = counts[:, :-1]
    expert_load = real / jnp.maximum(jnp.sum(real, axis=-1, keepdims=True), 1.0)
    return {
        "expert_load": expert_load,
        "skip_share": counts[:, -1] / jnp.maximum(jnp.sum(counts, axis=-1), 1.0),
        "max_load_ratio": jnp.max(expert_load, axis=-1) * real.shape[-1],
    }
