"""Starts `zaya serve` in a subprocess on a free localhost port, for the server tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

START_TIMEOUT_S = 300  # loading plus compiling the engine on a shared 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, cache_dir: str | None = None):
    """Yields the base URL (``http://127.0.0.1:PORT``) of a `zaya serve` started with ``args``."""
    port = free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if cache_dir:  # compiled programs persist across the test modules' servers
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "zaya_jax.cli", "serve", "--port", str(port), "--log-level",
                             "warning", *args], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"zaya serve exited with {proc.returncode}: {log.read()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"zaya serve did not answer /health within {START_TIMEOUT_S} s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wait_for(predicate, timeout: float, interval: float = 0.1) -> bool:
    """Polls ``predicate`` until it holds (True) or ``timeout`` seconds pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
