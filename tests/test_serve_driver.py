"""The serve driver thread, against a scripted engine: what /health's load says while a step runs, and
a failing engine."""

import threading

import pytest
from serve_util import wait_for

from zaya_jax.infer.serve.driver import Driver


class ScriptedEngine:
    """Holds submitted requests as "waiting"; ``step`` admits them all, then blocks until released."""

    def __init__(self, fail: bool = False):
        self.waiting, self.running, self.fail = 0, 0, fail
        self.stepping, self.release = threading.Event(), threading.Event()

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self) -> None:
        self.waiting += 1

    def step(self) -> None:
        if self.fail:
            raise RuntimeError("device lost")
        self.running, self.waiting = self.running + self.waiting, 0
        self.stepping.set()
        self.release.wait(timeout=30)
        self.running = 0  # every request finished in this step


def test_a_submitted_request_is_in_the_load_while_a_long_step_runs():
    engine = ScriptedEngine()
    driver = Driver(engine)
    driver.start()
    try:
        driver.call(lambda e: e.submit())
        assert engine.stepping.wait(timeout=10)
        # The step is still running: the request must not look finished (it was once published as idle).
        assert driver.load == {"running": 0, "waiting": 1}
        engine.release.set()
        assert wait_for(lambda: driver.load == {"running": 0, "waiting": 0}, timeout=10)
    finally:
        engine.release.set()
        driver.close()


def test_a_failed_engine_refuses_new_calls():
    driver = Driver(ScriptedEngine(fail=True))
    driver.start()
    try:
        driver.call(lambda e: e.submit())
        assert wait_for(lambda: driver.failure is not None, timeout=10)
        with pytest.raises(RuntimeError, match="the engine failed: RuntimeError\\('device lost'\\)"):
            driver.call(lambda e: e.submit())
    finally:
        driver.close()
