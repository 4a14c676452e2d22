"""Helpers of the server tests."""

from __future__ import annotations

import os
import time

from zaya_jax.infer.serve.launch import running_server


def demo_server(tmp_path_factory, *args: str):
    """`zaya serve` on the demo model (CPU), with a JAX compilation cache shared by every server of the test run."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return running_server(*args, cache_dir=str(tmp_path_factory.getbasetemp() / "jax-cache"), env=env)


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Polls ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
