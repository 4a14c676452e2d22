"""The ASGI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus /health and /metrics.

Every request first passes ``Guard`` (the Host, Origin and Content-Type a web page could forge). A
request's path runs one way, each step in its own module: ``protocol`` parses the body, ``validate``
checks it against this server (a 400 with OpenAI's error object otherwise), the handler reserves its
engine rows against the queue bound (429 when full) before tokenizing anything, ``build`` makes the
engine's inputs on a worker thread (never on the event loop), ``jobs`` runs them on the driver thread,
and ``render`` answers — as one JSON body, or as server-sent events ending ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import threading
import time
import urllib.parse
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..constraints import GrammarVocabulary
from ..tokenizer import Tokenizer, TokenizerError
from . import build, render, validate
from .driver import Driver
from .jobs import ClientGone, Reservation, Timing, generate_choices, run_rsa
from .metrics import Metrics, RequestCounter
from .protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatRequest,
    CompletionRequest,
    Delta,
    ModelList,
    Usage,
    parse,
)

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})  # the names this machine answers to by default


@dataclasses.dataclass
class Server:
    """What the handlers share. ``capacity``: engine rows (running + queued) in flight at most."""

    driver: Driver
    tokenizer: Tokenizer
    model_id: str
    model_path: str
    capacity: int
    api_key: str | None = None
    metrics_key: str | None = None  # the key /metrics takes; None: api_key
    max_body_bytes: int = 1 << 20
    allowed_hosts: frozenset[str] | None = LOCAL_HOSTS  # Host / Origin host names answered; None: any
    in_flight: int = 0  # engine rows reserved by handlers; only touched on the event loop
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    metrics: Metrics = dataclasses.field(init=False)
    _grammars: GrammarVocabulary | None = dataclasses.field(default=None, init=False, repr=False)
    _grammars_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.metrics = Metrics(self.driver, lambda: self.in_flight)

    def grammars(self) -> GrammarVocabulary:
        """The vocabulary grammars compile against, built on first use (about a second for a large vocabulary;
        call it off the event loop)."""
        with self._grammars_lock:
            if self._grammars is None:
                config = self.engine.config
                self._grammars = GrammarVocabulary(self.tokenizer.tokenizer, config.vocab_size, config.eos_token_id)
            return self._grammars

    @property
    def engine(self):
        return self.driver.engine

    def reserve(self, rows: int, param: str = "n") -> Reservation:
        """Counts ``rows`` engine sequences against the queue bound until the returned reservation is released
        (the handler drops its hold when its response ends, the engine work when it is over); 429 when full,
        400 naming ``param`` (the field that asked for them) when they can never fit."""
        if self.driver.failure is not None:
            raise APIError(503, f"the engine failed: {self.driver.failure!r}", type="server_error")
        if rows > self.capacity:
            raise APIError(400, f"the request needs {rows} sequences; this server holds {self.capacity} at most",
                           param=param)
        if self.in_flight + rows > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.in_flight} of {self.capacity} sequences running "
                                "or queued); retry later", type="rate_limit_error", code="queue_full")
        self.in_flight += rows
        return Reservation(lambda: self._release(rows))

    def _release(self, rows: int) -> None:
        self.in_flight -= rows

    def decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's own string, special tokens spelled out (as log-probs name tokens)."""
        return self.tokenizer.decode([token])

    def encode(self, text: str, what: str, param: str, **kwargs) -> list[int]:
        """``text``'s token ids, refused by its length before tokenizing when it cannot fit the context;
        text the tokenizer refuses is a 400 naming ``what`` and ``param``. Call it off the event loop."""
        try:
            return self.tokenizer.encode(text, max_tokens=self.engine.max_len - 1, **kwargs)
        except TokenizerError as e:
            raise APIError(400, f"{what}: {e}", param=param) from None


class Guard:
    """ASGI middleware refusing what a web page could send from a browser: a Host header this server does
    not answer to (DNS rebinding: 400), an Origin of another site (403), and a POST whose body is not
    declared ``application/json`` (a form or text/plain post needs no CORS preflight: 415)."""

    def __init__(self, app, allowed_hosts: frozenset[str] | None):
        self.app, self.allowed_hosts = app, allowed_hosts

    async def __call__(self, scope, receive, send):
        error = self.refusal(scope) if scope["type"] == "http" else None
        if error is None:
            await self.app(scope, receive, send)
        else:
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)

    def _allowed(self, host: str | None) -> bool:
        return self.allowed_hosts is None or host in self.allowed_hosts

    def refusal(self, scope) -> APIError | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        hint = "; start the server with --allowed-hosts NAME to answer to another name"
        if "host" in headers and not self._allowed(urllib.parse.urlsplit("//" + headers["host"]).hostname):
            return APIError(400, f"Host {headers['host']!r} is not a name this server answers to{hint}",
                            code="host_not_allowed")
        if "origin" in headers and not self._allowed(urllib.parse.urlsplit(headers["origin"]).hostname):
            return APIError(403, f"cross-origin request from {headers['origin']!r} refused{hint}",
                            code="origin_not_allowed")
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and media != "application/json":
            return APIError(415, f"a POST body must be JSON sent as Content-Type application/json, got "
                                 f"{headers.get('content-type', 'none')!r}", code="unsupported_media_type")
        return None


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="zaya serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, allowed_hosts=server.allowed_hosts)
    app.add_middleware(RequestCounter, metrics=server.metrics, routes=lambda: app.routes)  # outermost: sees all

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.get("/health")
    async def health():
        failed = server.driver.failure
        body = {"status": "failed" if failed else "ok", "model": server.model_id, "slots": server.engine.slots,
                "max_len": server.engine.max_len, "in_flight": server.in_flight, **server.driver.load,
                "finished": server.driver.finished_counts(), "engine": server.driver.stats}
        return JSONResponse(body, status_code=503 if failed else 200)

    @app.get("/metrics")
    async def metrics(request: Request):
        _authorize(request, server.metrics_key or server.api_key)
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(request, server.api_key)
        return ModelList(data=[_model_card(server)]).model_dump()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(request, server.api_key)
        if model_id != server.model_id:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {server.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(server).model_dump()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read(server, request, CompletionRequest)
        prompts = build.completion_list(body.prompt)
        return await _generate(server, request, body, len(prompts),
                               lambda: build.completion_prompts(server, prompts), chat=False,
                               echo=prompts if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read(server, request, ChatRequest)
        if body.rsa is not None:
            return await _rsa(server, request, body)
        return await _generate(server, request, body, 1, lambda: [build.chat_prompt(server, body.messages)],
                               chat=True)

    return app


# ------------------------------------------------------------------------------------------------ checks
def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    if not secrets.compare_digest(request.headers.get("authorization", ""), f"Bearer {key}"):
        raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                       type="authentication_error", code="invalid_api_key")


async def _read(server: Server, request: Request, model):
    _authorize(request, server.api_key)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > server.max_body_bytes:
        raise APIError(400, f"request body of {declared} bytes is over the limit of {server.max_body_bytes} bytes",
                       code="body_too_large")
    body = parse(model, await _body(request, server.max_body_bytes), server.max_body_bytes)
    validate.check_model(body, server.model_id)
    return body


async def _body(request: Request, limit: int) -> bytes:
    """The request body, read as it streams in and refused once past ``limit`` bytes: a chunked body (no
    Content-Length) never sits whole in memory first."""
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            raise APIError(400, f"request body is over the limit of {limit} bytes", code="body_too_large")
        parts.append(part)
    return b"".join(parts)


# ------------------------------------------------------------------------------------------------ generation
async def _generate(server: Server, request: Request, body, count: int, tokenize: Callable[[], list[list[int]]], *,
                    chat: bool, echo: list | None = None):
    """Runs ``count`` prompts x ``body.n``: their rows are reserved first, then ``tokenize()`` gives the
    prompts' token ids on a worker thread. ``echo``: the prompts as given, to start each choice's text."""
    stops = body.stop_strings()
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    rows = count * body.n
    held = server.reserve(rows)
    try:
        prompts = await asyncio.to_thread(tokenize)
        validate.check_generation(body, prompts, server.engine)
        # A response_format's grammar may take a while to compile: off the event loop.
        knobs = await asyncio.to_thread(build.engine_knobs, body, prompts, server.engine, server.grammars)
    except BaseException:
        held.drop()
        raise
    header = render.Header(server.model_id, chat)
    usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
    timing = Timing(request.state.received)
    rendering = render.ChoiceRendering(body, prompts, echo, chat, server.decode, server.token_text)

    def events(disconnected=None):
        return generate_choices(server.driver, prompts, body.n, knobs=knobs, seed=seed, stops=stops,
                                decode=server.decode, disconnected=disconnected, timing=timing, reservation=held)

    def answered(used: list[int]) -> None:
        """Fills in the usage from each choice's tokens and records the request's metrics."""
        usage["completion_tokens"] = sum(used)
        server.metrics.answered(usage, timing, max(used))

    if body.stream:
        return _sse(held, render.stream_chunks(events(), header, usage, rows, body.include_usage(), answered,
                                               rendering))
    gone = _Disconnect(request)
    try:
        texts, finish, used, logprobs = [""] * rows, [None] * rows, [0] * rows, [None] * rows
        async for event in events(gone):
            i = event.index
            texts[i] += rendering.text(event)
            finish[i], used[i] = event.finish_reason, event.tokens_used
            logprobs[i] = rendering.join(logprobs[i], rendering.logprobs(event))
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        gone.close()
        held.drop()
    answered(used)
    return header.body(render.choices(chat, texts, finish, logprobs), usage=Usage.of(**usage)).model_dump()


def _sse(held: Reservation, chunks: AsyncIterator) -> StreamingResponse:
    """Server-sent events of ``chunks``, then ``data: [DONE]``; the handler's hold on the rows is dropped when
    the response ends, however it ends (a client that disconnects cancels ``chunks`` and so its engine
    requests, whose own hold lasts until the engine has finished them)."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk.model_dump())}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return _Stream(body(), held.drop)


class _Disconnect:
    """Whether the client of a non-streamed request has gone away (called as ``await gone()``): a task
    waits for the ASGI ``http.disconnect`` message, as Starlette's streaming responses do."""

    def __init__(self, request: Request):
        self.task = asyncio.create_task(self._wait(request.receive))

    @staticmethod
    async def _wait(receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def __call__(self) -> bool:
        return self.task.done()

    def close(self) -> None:
        self.task.cancel()


class _Stream(StreamingResponse):
    """An event stream that calls ``on_end`` once it is over, even if its body never started."""

    def __init__(self, body, on_end):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_end = on_end

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_end()


def _model_card(server: Server):
    return render.model_card(server.model_id, server.created, server.engine.max_len)


# ------------------------------------------------------------------------------------------------ Markov RSA
async def _rsa(server: Server, request: Request, body: ChatRequest):
    validate.check_rsa(body)
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    job = await asyncio.to_thread(build.rsa_request, server, body, seed)
    search, rsa = job.search, job.settings
    held = server.reserve(rsa.population, param="rsa.population")
    header = render.Header(server.model_id, chat=True)
    timing = Timing(request.state.received)

    def final(result) -> tuple[str, str, Usage]:
        usage = Usage.of(job.prompt_tokens, result.generated_tokens)
        server.metrics.answered(usage.model_dump(), timing)
        return *render.rsa_content(result), usage

    if body.stream:
        async def chunks():
            async for kind, value in run_rsa(server.driver, search, reservation=held):
                if kind == "round":
                    yield header.chunk([], rsa_progress=render.rsa_progress(*value, rsa.rounds))
                    continue
                content, finish, usage = final(value)
                delta = Delta(role="assistant", content=content)
                yield header.chunk([ChatChunkChoice(index=0, delta=delta, finish_reason=finish)],
                                   rsa=render.rsa_extension(value, rsa))
                if body.include_usage():
                    yield header.chunk([], usage=usage)

        return _sse(held, chunks())
    gone = _Disconnect(request)
    try:
        async for kind, value in run_rsa(server.driver, search, gone, reservation=held):
            result = value
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        gone.close()
        held.drop()
    content, finish, usage = final(result)
    choice = ChatChoice(index=0, message=AssistantMessage(content=content), finish_reason=finish)
    return header.body([choice], usage=usage, rsa=render.rsa_extension(result, rsa)).model_dump()
