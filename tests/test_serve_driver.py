"""The serve driver thread and the jobs on it, against scripted engines: what /health's load says while a
step runs, a failing engine, work that fails to start without stopping the driver, and the rows a
disconnected request holds until the engine has finished its work."""

import asyncio
import threading
import types

import pytest
from serve_util import wait_for

from zaya_jax.infer.serve.driver import Driver, Steppable
from zaya_jax.infer.serve.jobs import ClientGone, Reservation, generate_choices, run_rsa
from zaya_jax.infer.serve.protocol import APIError


class ScriptedEngine:
    """Holds submitted requests as "waiting"; ``step`` admits them all, then blocks until released."""

    def __init__(self, fail: bool = False):
        self.waiting, self.running, self.fail, self.steps = 0, 0, fail, 0
        self.stepping, self.release = threading.Event(), threading.Event()
        self.on_admit = lambda: None  # what admitting a request does besides (a request's on_update)

    def stats(self) -> dict:
        return {"decode_steps": self.steps}

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)

    def submit(self) -> None:
        self.waiting += 1

    def step(self) -> None:
        if self.fail:
            raise RuntimeError("device lost")
        self.running, self.waiting = self.running + self.waiting, 0
        self.on_admit()
        self.stepping.set()
        self.release.wait(timeout=30)
        self.running = 0  # every request finished in this step
        self.steps += 1


@pytest.mark.parametrize("streams, during", [(False, {"running": 0, "waiting": 1}), (True, {"running": 1, "waiting": 0})])
def test_a_submitted_request_is_in_the_load_while_a_long_step_runs(streams, during):
    """The step admits the request, then runs on (a compile); once the request streams (its first token, from
    the step's insert), the load shows it running."""
    engine = ScriptedEngine()
    assert isinstance(engine, Steppable)
    driver = Driver(engine)
    if streams:
        engine.on_admit = lambda: driver.updated(types.SimpleNamespace(done=False, stop_reason=None))
    driver.start()
    try:
        driver.call(lambda e: e.submit())
        assert engine.stepping.wait(timeout=10)
        # The step is still running: the request must not look finished (it was once published as idle).
        assert driver.load == during
        engine.release.set()
        assert wait_for(lambda: driver.load == {"running": 0, "waiting": 0}, timeout=10)
        assert driver.stats == {"decode_steps": 1}  # the engine's counters, published with the load
    finally:
        engine.release.set()
        driver.close()


def test_a_failed_engine_runs_no_more_calls():
    engine = ScriptedEngine(fail=True)
    driver = Driver(engine)
    driver.start()
    try:
        driver.call(lambda e: e.submit())
        assert wait_for(lambda: driver.failure is not None, timeout=10)
        assert repr(driver.failure) == "RuntimeError('device lost')"
        driver.call(lambda e: e.submit())  # a cleanup after the failure: neither raises nor runs
        assert engine.waiting == 1
    finally:
        driver.close()


class FailingEngine:
    """Submits fail at request index ``fail_at``; records cancels. Never busy: the driver only runs calls."""

    busy, running, waiting = False, 0, 0

    def __init__(self, fail_at: int):
        self.fail_at, self.cancelled = fail_at, []

    def stats(self) -> dict:
        return {}

    def submit(self, prompt, *, index, on_update, **knobs):
        if index == self.fail_at:
            raise OverflowError("Python int too large to convert to C long")
        return types.SimpleNamespace(index=index, done=False)

    def cancel(self, request) -> None:
        self.cancelled.append(request.index)


def _drain(driver: Driver) -> None:
    """Returns once the driver has run every call made before this one."""
    done = threading.Event()
    driver.call(lambda engine: done.set())
    assert done.wait(timeout=10)


def test_a_submit_that_raises_is_a_400_and_the_driver_lives_on():
    engine = FailingEngine(fail_at=1)
    driver = Driver(engine)
    driver.start()

    async def consume():
        async for _ in generate_choices(driver, [[5, 6]], 2, knobs={}, seed=0, stops=[], decode=str):
            pass

    try:
        with pytest.raises(APIError, match="too large to convert") as info:
            asyncio.run(consume())
        assert info.value.status == 400
        _drain(driver)
        # The request queued before the failure is cancelled; the one never made is skipped (it once raised
        # AttributeError on the driver's thread and stopped it).
        assert driver.failure is None and engine.cancelled and set(engine.cancelled) == {0}
    finally:
        driver.close()


def test_an_rsa_search_that_fails_to_start_is_a_400_and_the_driver_lives_on():
    class Search:
        progress = on_problem = None

        def start(self, engine):
            raise ValueError("temperature must be finite")

    driver = Driver(FailingEngine(fail_at=-1))
    driver.start()

    async def consume():
        async for _ in run_rsa(driver, Search()):
            pass

    try:
        with pytest.raises(APIError, match="rsa: temperature must be finite"):
            asyncio.run(consume())
        _drain(driver)
        assert driver.failure is None
    finally:
        driver.close()


class SteppedEngine:
    """Requests run until cancelled, and a cancel takes effect at the next step (as ``Engine.cancel`` of a
    running request); each step waits for a go from the test."""

    waiting = 0

    def __init__(self):
        self.live, self.cancels, self.stepping, self.go = [], [], threading.Semaphore(0), threading.Semaphore(0)

    @property
    def busy(self) -> bool:
        return bool(self.cancels)

    @property
    def running(self) -> int:
        return len(self.live)

    def stats(self) -> dict:
        return {}

    def submit(self, prompt, *, on_update, **knobs):
        request = types.SimpleNamespace(done=False, stop_reason=None, on_update=on_update, token_logprobs=[],
                                        prompt_logprobs=None)
        self.live.append(request)
        return request

    def cancel(self, request) -> None:
        self.cancels.append(request)

    def step(self) -> None:
        self.stepping.release()
        assert self.go.acquire(timeout=30)
        cancels, self.cancels = self.cancels, []
        for request in cancels:
            self.live.remove(request)
            request.done, request.stop_reason = True, "cancelled"
            request.on_update(request, [])


class TwoRoundSearch:
    """What ``run_rsa`` needs of an ``RSASearch``: round 1 is submitted once round 0 is over, however it
    ended (as a cancelled search runs its rounds out)."""

    progress = on_problem = None

    def __init__(self, population: int = 2):
        self.population, self.round, self.done = population, 0, False

    def start(self, engine) -> None:
        self.engine = engine
        self.submit_round()

    def submit_round(self) -> None:
        self.left = self.population
        for _ in range(self.population):
            self.engine.submit([5, 6], on_update=self.member_done)

    def member_done(self, request, new) -> None:
        if not request.done:
            return
        self.left -= 1
        if self.left == 0 and self.round == 0:
            self.round = 1
            self.submit_round()
        elif self.left == 0:
            self.done = True
            self.on_problem(0, "result")


@pytest.mark.parametrize("job", ["generate", "rsa"])
def test_a_disconnected_request_holds_its_rows_until_the_engine_has_finished_them(job):
    """The server's in_flight (the reservation) stays counted while the engine still runs a request whose client
    left: a running request's cancel takes effect at the next step, and a cancelled search submits its next round
    (cancelled in turn) at that step."""
    engine = SteppedEngine()
    driver = Driver(engine)
    driver.start()

    async def scenario():
        released = asyncio.Event()
        held = Reservation(released.set)

        async def gone():
            return bool(engine.live)  # the client leaves once its requests are in the engine

        events = (generate_choices(driver, [[5, 6]], 2, knobs={}, seed=0, stops=[], decode=str, disconnected=gone,
                                   reservation=held) if job == "generate" else
                  run_rsa(driver, TwoRoundSearch(), gone, reservation=held))
        with pytest.raises(ClientGone):
            async for _ in events:
                pass
        held.drop()  # the handler's response has ended
        for _ in range(2 if job == "rsa" else 1):  # rsa: round 1, submitted at the first step, ends at the second
            assert await asyncio.to_thread(engine.stepping.acquire, timeout=10)
            await asyncio.sleep(0.05)  # time for a release the driver might have handed the loop
            assert not released.is_set() and engine.live
            engine.go.release()
        await asyncio.wait_for(released.wait(), timeout=10)
        assert not engine.live

    try:
        asyncio.run(scenario())
        assert driver.failure is None
    finally:
        engine.go.release(8)
        driver.close()
