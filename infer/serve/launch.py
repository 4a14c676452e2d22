"""``running_server``: `zaya serve` in a subprocess on a free localhost port, for tests, benchmarks and scripts."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, cache_dir: str | None = None, start_timeout_s: float = 300,
                   env: dict | None = None) -> Iterator[str]:
    """Starts ``zaya serve ARGS`` on 127.0.0.1 and yields its base URL once /health answers; stops it on exit.

    ``cache_dir``: a JAX compilation cache shared by the servers started with it (compiles once).
    ``start_timeout_s`` bounds loading plus compiling (minutes on a small shared CPU machine).
    """
    port = free_port()
    env = dict(os.environ if env is None else env)
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen([sys.executable, "-m", "zaya_jax.cli", "serve", "--port", str(port), "--log-level",
                             "warning", *args], env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
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
                raise TimeoutError(f"zaya serve did not answer /health within {start_timeout_s} s")
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
