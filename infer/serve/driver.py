"""The engine's one driver thread: HTTP handlers hand it work through a thread-safe queue.

The engine is not thread-safe, so every ``submit``, ``cancel`` and ``step`` happens here. A handler
calls ``Driver.call(fn)``; ``fn(engine)`` runs on this thread before the next step, in call order (so a
cancel always sees the submit made before it). Tokens flow back through the requests' ``on_update``
callbacks, which run on this thread and must only hand data over (e.g. ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from typing import Callable, Protocol, runtime_checkable

log = logging.getLogger("zaya.serve")
_STOP = object()


@runtime_checkable
class Steppable(Protocol):
    """What the driver needs of an engine (``Engine`` is one; tests script others): the calls handed to it
    use the rest of the engine's interface (``submit``, ``cancel``)."""

    @property
    def busy(self) -> bool: ...

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    def step(self) -> None: ...

    def stats(self) -> dict: ...


class Driver:
    def __init__(self, engine: Steppable):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="zaya-engine", daemon=True)
        self.failure: BaseException | None = None
        self._finished: collections.Counter = collections.Counter()  # engine stop reasons seen
        self._lock = threading.Lock()
        # For /health: published after every batch of calls and every step, so a submitted request is
        # always in "waiting", "running" or the finished counts (a step can run for seconds).
        self.load = {"running": 0, "waiting": 0}
        self.stats: dict = engine.stats()  # the engine's counters (Engine.stats), published as the load is
        # When the current (or last) step began (time.perf_counter): a request's first token comes from the
        # step that admitted it to a slot, so its on_update reads here when it was admitted.
        self.step_started = 0.0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        self._inbox.put(_STOP)
        self._thread.join(timeout)

    def call(self, fn: Callable[[Steppable], None]) -> None:
        """Runs ``fn(engine)`` on the driver thread; nothing once the engine has failed (handlers see
        ``failure``: new requests get 503, waiting ones 500), so a cleanup call never raises."""
        if self.failure is None:
            self._inbox.put(fn)

    def warm_up(self, prompt: list[int], max_new_tokens: int) -> float:
        """Runs one request through the engine on the calling thread (before ``start``): compiles the
        prefill, insert and decode programs. Returns the seconds it took."""
        t0 = time.perf_counter()
        request = self.engine.submit(prompt, max_new_tokens=max_new_tokens, stop_token_ids=[])
        while not request.done:
            self.engine.step()
        self._publish()  # its counters, before any request
        return time.perf_counter() - t0

    def updated(self, request) -> None:
        """Call from every ``on_update`` callback: republishes the load (a step that admits a request and
        then compiles runs for seconds, and the request streams meanwhile) and counts a finished request's
        stop reason."""
        self._publish()
        if request.done:
            with self._lock:
                self._finished[request.stop_reason] += 1

    def finished_counts(self) -> dict[str, int]:
        """How many engine requests ended with each stop reason (any thread)."""
        with self._lock:
            return dict(self._finished)

    def _publish(self) -> None:
        self.stats = self.engine.stats()
        self.load = {"running": self.engine.running, "waiting": self.engine.waiting}

    def _run(self) -> None:
        try:
            while True:
                try:  # block only when there is nothing to step
                    fn = self._inbox.get(block=not self.engine.busy)
                except queue.Empty:
                    fn = None
                while fn is not None:
                    if fn is _STOP:
                        return
                    fn(self.engine)
                    fn = self._inbox.get_nowait() if not self._inbox.empty() else None
                self._publish()
                if self.engine.busy:
                    self.step_started = time.perf_counter()
                    self.engine.step()
                    self._publish()
        except BaseException as e:  # the engine is unusable now: /health reports it, new requests get 503
            log.exception("the engine driver failed")
            self.failure = e
