"""What one HTTP request runs on the engine, as async iterators of events for the handlers.

``generate_choices``: a completion's choices (``len(prompts) x n`` engine requests, choice ``i`` keyed
as ``generate``'s row ``i``), yielding text deltas cut at stop strings (``ChoiceEvent``s). ``run_rsa``: a Markov RSA search,
yielding per-round progress and the result. Both cancel what is left of their engine requests when the
consumer stops early (a client that disconnects), which frees the slots; both hold the request's
``Reservation`` until the engine has finished every request they made (a cancel takes effect at the
engine's next step, and a cancelled search's later rounds are each submitted and cancelled).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import AsyncIterator, Awaitable, Callable, NamedTuple

from ..logprobs import TokenLogprob
from .driver import Driver
from .protocol import APIError
from .text import ChoiceText

POLL_S = 0.1  # how often a waiting handler checks for a disconnected client or a failed engine


@dataclasses.dataclass
class Timing:
    """When a generation request was received, admitted to a slot and got its first token
    (``time.perf_counter`` seconds); ``admitted`` is set on the driver's thread, the rest on the event loop."""

    received: float
    admitted: float | None = None
    first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()


class ChoiceEvent(NamedTuple):
    """What one choice has to send: ``text`` (a delta), ``finish_reason`` on its last event,
    ``tokens_used`` so far, the ``logprobs`` of those tokens not sent before (when the request asked them:
    they may run ahead of ``text`` by what a stop string holds back, and include a stop token that is not
    shown), and on its first event ``prompt_logprobs`` (when asked: ``Request.prompt_logprobs``)."""

    index: int
    text: str
    finish_reason: str | None
    tokens_used: int
    logprobs: list[TokenLogprob]
    prompt_logprobs: list[TokenLogprob | None] | None


class ClientGone(Exception):
    """The client closed the connection; the request's engine work has been cancelled."""


class Reservation:
    """Engine rows one HTTP request counts against the server's queue bound, given back (``release()``) once
    nothing holds them: the handler until its response ends, and the engine work it started until the
    engine has finished all of it. Only touched on the event loop."""

    def __init__(self, release: Callable[[], None]):
        self._release, self._holders = release, 1  # the handler's hold

    def hold(self) -> None:
        self._holders += 1

    def drop(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release()


class _Outstanding:
    """A job's unfinished engine requests, counted on the driver thread; ``settled()`` runs once the job
    will submit no more (``close``) and every request it made is finished."""

    def __init__(self, settled: Callable[[], None]):
        self.open, self.closed, self._settled = 0, False, settled

    def submitted(self) -> None:
        self.open += 1

    def finished(self) -> None:
        self.open -= 1
        self._check()

    def close(self) -> None:
        self.closed = True
        self._check()

    def _check(self) -> None:
        if self.closed and self.open == 0 and self._settled is not None:
            self._settled()
            self._settled = None


def _hold(reservation: Reservation | None) -> _Outstanding:
    """Takes the engine work's hold on ``reservation``; the returned counter drops it, on the event loop,
    once the work is over."""
    if reservation is None:
        return _Outstanding(lambda: None)
    reservation.hold()
    return _Outstanding(_on_loop(reservation.drop))


async def _next(updates: asyncio.Queue, driver: Driver, disconnected: Callable[[], Awaitable[bool]] | None):
    while True:  # checked before every update too: a busy stream of updates must not hide a disconnect
        if driver.failure is not None:
            raise APIError(500, f"the engine failed: {driver.failure!r}", type="server_error")
        if disconnected is not None and await disconnected():
            raise ClientGone()
        try:
            return await asyncio.wait_for(updates.get(), POLL_S)
        except asyncio.TimeoutError:
            pass


def _on_loop(fn: Callable) -> Callable:
    """``fn`` made callable from any thread: it runs on the current event loop (a no-op once that loop has
    closed)."""
    loop = asyncio.get_running_loop()

    def call(*args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    return call


async def generate_choices(driver: Driver, prompts: list[list[int]], n: int, *, knobs: dict, seed: int,
                           stops: list[str], decode: Callable, disconnected=None, timing: Timing | None = None,
                           reservation: Reservation | None = None) -> AsyncIterator[ChoiceEvent]:
    """Yields a ``ChoiceEvent`` as text arrives; ``finish_reason`` is set on a choice's last event. Choice
    ``p * n + j`` is sample ``j`` of prompt ``p``. ``timing`` gets when the first choice was admitted and
    when the first token arrived."""
    updates: asyncio.Queue = asyncio.Queue()
    put = _on_loop(updates.put_nowait)
    requests: list = [None] * (len(prompts) * n)
    outstanding = _hold(reservation)

    def on_update(i):
        def update(request, new):
            driver.updated(request)
            if timing is not None and new and timing.admitted is None:  # the step that admitted it
                timing.admitted = driver.step_started
            # The new tokens' log-probs (none unless asked); prompt_logprobs is set before any update.
            put((i, list(new), request.stop_reason, request.token_logprobs[-len(new):] if new else [],
                 request.prompt_logprobs))
            if request.done:
                outstanding.finished()
        return update

    def submit(engine) -> None:
        try:
            for i in range(len(requests)):
                requests[i] = engine.submit(prompts[i // n], index=i, seed=seed, on_update=on_update(i), **knobs)
                outstanding.submitted()
        except Exception as e:  # checked before; a request that slips through must not stop the driver
            for r in requests:
                if r is not None:
                    engine.cancel(r)
            put((None, str(e) or repr(e), None, [], None))
        outstanding.close()

    def cancel(indices) -> None:  # a failed submit leaves some requests None
        driver.call(lambda engine: [engine.cancel(requests[i]) for i in indices if requests[i] is not None])

    choices = [ChoiceText(decode, stops) for _ in requests]
    scores: list[list[TokenLogprob]] = [[] for _ in requests]  # each choice's token log-probs received
    sent = [None] * len(requests)  # log-probs each choice has sent (None: no event yet)
    left = set(range(len(choices)))
    driver.call(submit)
    try:
        while left:
            i, new, reason, entries, prompt_logprobs = await _next(updates, driver, disconnected)
            if i is None:
                raise APIError(400, new)
            if i not in left:
                continue  # the cancellation of a choice a stop string already ended
            if timing is not None and new:
                timing.token()
            choice = choices[i]
            scores[i] += entries
            delta = choice.feed(new, reason)
            if choice.finish_reason is not None:
                left.discard(i)
                if reason is None:  # a stop string ended it: free the slot now
                    cancel([i])
            if delta or choice.finish_reason is not None:
                first, upto = sent[i] is None, max(sent[i] or 0, choice.tokens_used)
                yield ChoiceEvent(i, delta, choice.finish_reason, choice.tokens_used, scores[i][sent[i] or 0:upto],
                                  prompt_logprobs if first else None)
                sent[i] = upto
    finally:
        if left:
            cancel(sorted(left))


class _Tracked:
    """The engine as an ``RSASearch`` sees it: records the search's requests, so that a client that goes
    away can cancel them (those it submits after that are cancelled before the next step), counts their
    stop reasons and tells ``outstanding`` of each one made and finished."""

    def __init__(self, engine, driver: Driver, outstanding: _Outstanding):
        self.engine, self.driver, self.requests, self.cancelled = engine, driver, [], False
        self.outstanding = outstanding

    @property
    def max_len(self) -> int:
        return self.engine.max_len

    def submit(self, prompt, *, on_update, **kwargs):
        def update(request, new):
            self.driver.updated(request)
            on_update(request, new)  # may submit the search's next round: counted before this one ends
            if request.done:
                self.outstanding.finished()

        request = self.engine.submit(prompt, on_update=update, **kwargs)
        self.requests.append(request)
        self.outstanding.submitted()
        if self.cancelled:  # after the search has filed it (cancelling here would re-enter its bookkeeping)
            self.driver.call(lambda engine: engine.cancel(request))
        return request

    def cancel(self) -> None:
        self.cancelled = True
        for request in list(self.requests):
            self.engine.cancel(request)


async def run_rsa(driver: Driver, search, disconnected=None, reservation: Reservation | None = None
                  ) -> AsyncIterator[tuple[str, object]]:
    """Runs ``search`` (an unstarted ``RSASearch`` of one problem, with no callbacks of its own) on the
    driver's engine; yields ``("round", (t, RSARound))`` as rounds finish and ``("result", RSAResult)`` at
    the end."""
    updates: asyncio.Queue = asyncio.Queue()
    put = _on_loop(updates.put_nowait)
    outstanding = _hold(reservation)

    def finished(p, result) -> None:  # the search submits nothing more
        put(("result", result))
        outstanding.close()

    search.progress = lambda t, rnd: put(("round", (t, rnd)))
    search.on_problem = finished
    tracked: list[_Tracked] = []

    def start(engine) -> None:
        tracked.append(_Tracked(engine, driver, outstanding))
        try:
            search.start(tracked[0])
        except Exception as e:  # checked before; a search that slips through must not stop the driver
            put(("error", str(e) or repr(e)))  # first: the cancels below may finish the search
            tracked[0].cancel()
            outstanding.close()

    driver.call(start)
    finished = False
    try:
        while not finished:
            kind, value = await _next(updates, driver, disconnected)
            if kind == "error":
                raise APIError(400, f"rsa: {value}", param="rsa")
            finished = kind == "result"
            yield kind, value
    finally:
        if not finished:
            driver.call(lambda engine: tracked[0].cancel())
