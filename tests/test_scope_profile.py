"""bench/scope_profile.py: an XLA:CPU profile summarised by the model's named scopes."""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import scope_profile  # noqa: E402


def _program():
    def f(x, w):
        with jax.named_scope("attention"):
            y = jnp.tanh(x @ w)

        def body(_, h):
            with jax.named_scope("experts"):
                return jnp.sin(h @ w)

        y = jax.lax.fori_loop(0, 3, body, y)
        with jax.named_scope("lm_head"):
            return (y @ w).sum()

    x, w = jnp.ones((32, 256)), jnp.full((256, 256), 1e-3)
    compiled = jax.jit(f).lower(x, w).compile()
    return compiled, x, w


def test_instructions_map_to_their_named_scope_and_control_flow_is_left_out():
    compiled, _, _ = _program()
    ops = scope_profile.instructions(compiled.as_text())
    scopes = {scope for scope, _ in ops.values()}
    assert {"attention", "experts", "lm_head"} <= scopes
    assert None in scopes  # the fori_loop's while: it only wraps the ops inside it
    for name, (scope, op_name) in ops.items():
        if scope in scope_profile.SCOPES:
            assert f"/{scope}/" in op_name, (name, op_name)


def test_profile_times_every_scope_that_ran():
    compiled, x, w = _program()
    op_times = scope_profile.profile(lambda: compiled(x, w), compiled.as_text(), calls=3)
    totals = scope_profile.by_scope(op_times, compiled.as_text())
    assert all(totals.get(s, 0) > 0 for s in ("attention", "experts", "lm_head")), totals
    assert None not in totals
