"""The ASGI app: OpenAI's /v1/models, /v1/completions and /v1/chat/completions, plus /health and /metrics.

Every request first passes ``Guard`` (the Host, Origin and Content-Type a web page could forge). Handlers
validate a request (a 400 with OpenAI's error object otherwise), reserve its engine rows against the queue
bound (429 when full) before tokenizing anything, tokenize on a worker thread (never on the event loop),
then hand it to the driver thread and relay its tokens — as one JSON body, or as server-sent events ending
``data: [DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import time
import urllib.parse
import uuid
from typing import AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from zaya_jax.cli import is_demo_model

from ..logprobs import check_count
from ..sampling import check_knobs
from ..tokenizer import Tokenizer, TokenizerError
from .driver import Driver
from .jobs import ChoiceEvent, ClientGone, Timing, generate_choices, run_rsa
from .logprob_json import CompletionLogprobs, chat_logprobs
from .metrics import Metrics, RequestCounter
from .protocol import APIError, ChatRequest, CompletionRequest, Message, RSAOptions, parse
from .text import FINISH

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

    def __post_init__(self):
        self.metrics = Metrics(self.driver, lambda: self.in_flight)

    @property
    def engine(self):
        return self.driver.engine

    def reserve(self, rows: int, param: str = "n") -> None:
        """Counts ``rows`` engine sequences against the queue bound until ``release``; 429 when full, 400 naming
        ``param`` (the field that asked for them) when they can never fit."""
        if self.driver.failure is not None:
            raise APIError(503, f"the engine failed: {self.driver.failure!r}", type="server_error")
        if rows > self.capacity:
            raise APIError(400, f"the request needs {rows} sequences; this server holds {self.capacity} at most",
                           param=param)
        if self.in_flight + rows > self.capacity:
            raise APIError(429, f"the server is at capacity ({self.in_flight} of {self.capacity} sequences running "
                                "or queued); retry later", type="rate_limit_error", code="queue_full")
        self.in_flight += rows

    def release(self, rows: int) -> None:
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
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _authorize(request, server.api_key)
        if model_id != server.model_id:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {server.model_id!r}",
                           param="model", code="model_not_found")
        return _model_card(server)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read(server, request, CompletionRequest)
        prompts = _completion_list(body.prompt)
        return await _generate(server, request, body, len(prompts), lambda: _completion_prompts(server, prompts),
                               chat=False, echo=prompts if body.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read(server, request, ChatRequest)
        if body.rsa is not None:
            return await _rsa(server, request, body)
        return await _generate(server, request, body, 1, lambda: [_chat_prompt(server, body.messages)], chat=True)

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
    if body.model != server.model_id:
        raise APIError(400, f"model {body.model!r} does not exist; this server serves {server.model_id!r}",
                       param="model", code="model_not_found")
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


def _prompt_ids(server: Server, ids, what: str) -> list[int]:
    try:
        return server.engine.check_prompt(ids, what)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt" if what.startswith("prompt") else "messages") from None


def _completion_list(prompt) -> list:
    """``prompt`` as a non-empty list of prompts (texts or token-id lists), not yet tokenized."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return prompt


def _completion_prompts(server: Server, prompts: list) -> list[list[int]]:
    return [_prompt_ids(server, server.encode(p, f"prompt {i}", "prompt") if isinstance(p, str) else p,
                        f"prompt {i}") for i, p in enumerate(prompts)]


def _chat_prompt(server: Server, messages: list[Message]) -> list[int]:
    try:
        text = server.tokenizer.render_chat([{"role": m.role, "content": m.text()} for m in messages])
    except Exception as e:  # a template may raise anything on odd input (raise_exception)
        raise APIError(400, f"cannot render the messages with the model's chat template: {e}",
                       param="messages") from None
    return _prompt_ids(server, server.encode(text, "messages", "messages", add_special_tokens=False), "messages")


def _check_sampling(body) -> None:
    """The sampling knobs as the engine checks them (in float32: a temperature of 1e39 is inf there); a
    400 naming the bad one, before anything reaches the engine's thread."""
    try:
        check_knobs(1, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def _knobs(server: Server, body, prompts: list[list[int]]) -> dict:
    """The engine's keyword arguments for ``body``; 400s name what is wrong."""
    max_tokens = getattr(body, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = body.max_tokens
    room = server.engine.max_len - max(len(p) for p in prompts)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} is beyond the context: the prompt has "
                            f"{server.engine.max_len - room} tokens and the maximum length is {server.engine.max_len} "
                            f"(at most {room} new tokens)", param="max_tokens")
    stop_ids = list(body.stop_token_ids or [])
    if not body.ignore_eos:
        stop_ids += [t for t in server.engine.config.eos_token_id if t not in stop_ids]
    _check_sampling(body)
    try:  # the engine's own check (vocabulary, count), before any work is queued
        server.engine.stop_id_row(stop_ids)
    except ValueError as e:
        eos = "" if body.ignore_eos else f" (the EOS ids {list(server.engine.config.eos_token_id)} included)"
        raise APIError(400, f"stop_token_ids: {e}{eos}", param="stop_token_ids") from None
    return dict(max_new_tokens=room if max_tokens is None else max_tokens, temperature=body.temperature,
                top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p, stop_token_ids=stop_ids,
                **_reports(server, body))


def _reports(server: Server, body) -> dict:
    """The engine's ``logprobs`` and ``prompt_logprobs`` for ``body``: chat's ``top_logprobs`` (with
    ``logprobs``), a completion's ``logprobs``, and with ``echo`` the same for the prompt (also without
    ``logprobs`` when ``max_tokens`` is 0: the engine scores the prompt and emits nothing)."""
    if isinstance(body, ChatRequest):
        asked = {"top_logprobs": (body.top_logprobs or 0) if body.logprobs else None}
        prompt = None
    else:
        asked = {"logprobs": body.logprobs}
        prompt = None
        if body.echo and (body.logprobs is not None or body.max_tokens == 0):
            prompt = body.logprobs or 0
    for name, value in asked.items():
        try:
            check_count(name, value, server.engine.config.vocab_size)
        except ValueError as e:
            raise APIError(400, str(e), param=name) from None
    return dict(logprobs=next(iter(asked.values())), prompt_logprobs=prompt)


class _Rendering:
    """What a generation request's ``ChoiceEvent``s become in OpenAI's objects: each choice's text (after
    its echoed prompt: the text as given, token ids decoded) and ``logprobs`` (None when not asked)."""

    def __init__(self, server: Server, body, prompts: list[list[int]], echo: list | None, chat: bool):
        self.server, self.prompts, self.n, self.chat = server, prompts, body.n, chat
        self.asked = bool(body.logprobs) if chat else body.logprobs is not None
        self.echo = None if echo is None else [p if isinstance(p, str) else server.decode(ids)
                                               for p, ids in zip(echo, prompts)]
        self.opened: set[int] = set()
        self.completion = [CompletionLogprobs(server.token_text) for _ in range(len(prompts) * body.n)]

    def text(self, event: ChoiceEvent) -> str:
        """The event's text, after the echoed prompt on a choice's first event."""
        first = event.index not in self.opened
        self.opened.add(event.index)
        return (self.echo[event.index // self.n] if self.echo is not None and first else "") + event.text

    def logprobs(self, event: ChoiceEvent) -> dict | None:
        if not self.asked:
            return None
        if self.chat:
            return chat_logprobs(event.logprobs, self.server.token_text)
        items = [(e.token, e) for e in event.logprobs]
        if self.echo is not None and event.prompt_logprobs is not None:
            items = list(zip(self.prompts[event.index // self.n], event.prompt_logprobs)) + items
        return self.completion[event.index].piece(items)


# ------------------------------------------------------------------------------------------------ generation
async def _generate(server: Server, request: Request, body, count: int, tokenize: Callable[[], list[list[int]]], *,
                    chat: bool, echo: list | None = None):
    """Runs ``count`` prompts x ``body.n``: their rows are reserved first, then ``tokenize()`` gives the
    prompts' token ids on a worker thread. ``echo``: the prompts as given, to start each choice's text."""
    stops = body.stop_strings()
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    rows = count * body.n
    server.reserve(rows)
    try:
        prompts = await asyncio.to_thread(tokenize)
        knobs = _knobs(server, body, prompts)
    except BaseException:
        server.release(rows)
        raise
    meta = _meta(server, "chat.completion" if chat else "text_completion")
    usage = {"prompt_tokens": sum(len(p) for p in prompts), "completion_tokens": 0}
    timing = Timing(request.state.received)
    rendering = _Rendering(server, body, prompts, echo, chat)

    def events(disconnected=None):
        return generate_choices(server.driver, prompts, body.n, knobs=knobs, seed=seed, stops=stops,
                                decode=server.decode, disconnected=disconnected, timing=timing)

    def answered(used: list[int]) -> None:
        """Fills in the usage from each choice's tokens and records the request's metrics."""
        usage["completion_tokens"] = sum(used)
        server.metrics.answered(usage, timing, max(used))

    if body.stream:
        return _sse(server, rows, _stream_choices(events(), meta, usage, chat, rows, body.include_usage(), answered,
                                                  rendering))
    gone = _Disconnect(request)
    try:
        texts, finish, used, logprobs = [""] * rows, [None] * rows, [0] * rows, [None] * rows
        async for event in events(gone):
            i = event.index
            texts[i] += rendering.text(event)
            finish[i], used[i] = event.finish_reason, event.tokens_used
            piece = rendering.logprobs(event)
            logprobs[i] = piece if logprobs[i] is None else {k: logprobs[i][k] + piece[k] for k in piece}
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        gone.close()
        server.release(rows)
    answered(used)
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": logprobs[i],
                    "finish_reason": finish[i]} for i in range(rows)]
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": logprobs[i], "finish_reason": finish[i]}
                   for i in range(rows)]
    return {**meta, "choices": choices, "usage": _usage(usage)}


async def _stream_choices(events, meta: dict, usage: dict, chat: bool, rows: int, include_usage: bool,
                          answered: Callable[[list[int]], None], rendering: _Rendering):
    chunk = dict(meta, object="chat.completion.chunk" if chat else "text_completion")
    if chat:  # OpenAI opens every choice with its role
        for i in range(rows):
            yield dict(chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}])
    used = [0] * rows
    async for event in events:
        used[event.index] = event.tokens_used
        text = rendering.text(event)
        piece = {"delta": {"content": text} if text else {}} if chat else {"text": text}
        yield dict(chunk, choices=[{"index": event.index, **piece, "logprobs": rendering.logprobs(event),
                                    "finish_reason": event.finish_reason}])
    answered(used)
    if include_usage:
        yield dict(chunk, choices=[], usage=_usage(usage))


def _sse(server: Server, rows: int, chunks: AsyncIterator[dict]) -> StreamingResponse:
    """Server-sent events of ``chunks``, then ``data: [DONE]``; the rows are released when the response
    ends, however it ends (a client that disconnects cancels ``chunks`` and so its engine requests)."""
    async def body():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        yield "data: [DONE]\n\n"

    return _Stream(body(), lambda: server.release(rows))


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


def _meta(server: Server, kind: str) -> dict:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": server.model_id}


def _usage(usage: dict) -> dict:
    return {**usage, "total_tokens": usage["prompt_tokens"] + usage["completion_tokens"]}


def _model_card(server: Server) -> dict:
    return {"id": server.model_id, "object": "model", "created": server.created, "owned_by": "zaya-jax",
            "max_model_len": server.engine.max_len}


# ------------------------------------------------------------------------------------------------ Markov RSA
def _rsa_search(server: Server, body: ChatRequest):
    """An unstarted ``RSASearch`` for the request's one user message, with the CLI's presets."""
    from zaya_jax.demo import data

    from ..rsa import RSASearch, TokenTemplate
    from ..rsa_cli import DEMO_MODE, KNOBS, PRESETS, settings

    opts: RSAOptions = body.rsa
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise APIError(400, "an rsa request takes exactly one user message: the question", param="messages")
    for name in ("max_tokens", "max_completion_tokens", "stop", "stop_token_ids"):
        if getattr(body, name):
            raise APIError(400, f"`{name}` does not apply to an rsa request (use rsa.budget / rsa.final_budget)",
                           param=name)
    if body.logprobs:
        raise APIError(400, "`logprobs` does not apply to an rsa request", param="logprobs")
    if body.n != 1:
        raise APIError(400, "an rsa request returns one choice (n=1)", param="n")
    _check_sampling(body)
    if opts.mode is not None and opts.mode not in (*PRESETS, DEMO_MODE):
        raise APIError(400, f"unknown rsa mode {opts.mode!r}; one of {sorted((*PRESETS, DEMO_MODE))}", param="rsa.mode")
    knobs = settings(argparse.Namespace(model=server.model_path, **opts.model_dump(include=set(KNOBS) | {"mode"})))
    demo = is_demo_model(server.model_path)
    question = server.encode(body.messages[0].text(), "messages", "messages", add_special_tokens=False)
    seed = body.seed if body.seed is not None else secrets.randbits(31)
    try:
        template = TokenTemplate.from_tokenizer(data.TEMPLATE, knobs["tails"], server.tokenizer) if demo else None
        search = RSASearch(server.engine.config, question, **knobs, final_budget=opts.final_budget,
                           temperature=body.temperature, top_p=body.top_p, seed=seed, template=template,
                           tokenizer=server.tokenizer)
    except ValueError as e:
        raise APIError(400, f"rsa: {e}", param="rsa") from None
    if search.max_len > server.engine.max_len:
        raise APIError(400, f"rsa: the search needs a context of {search.max_len} tokens; this server's maximum "
                            f"length is {server.engine.max_len}", param="rsa")
    prompt_tokens = len(search.template.round0_prefix) + len(question) + len(search.template.round0_suffix)
    return search, dict(knobs, final_budget=opts.final_budget or knobs["budget"], seed=seed), prompt_tokens


def _rsa_extension(result, settings: dict) -> dict:
    answer, share = result.majority[0]
    return {"answer": answer, "share": share, "answers": result.answers[0], "texts": result.texts[0],
            "generated_tokens": result.generated_tokens, "settings": settings,
            "rounds": [{"round": t, "generated_tokens": r.generated_tokens, "seconds": round(r.seconds, 3)}
                       for t, r in enumerate(result.rounds)]}


def _rsa_content(result) -> tuple[str, str]:
    """The final text of the first member whose answer is the majority's (the first text if none), and its
    finish reason ("length" when the budget cut it)."""
    answer = result.majority[0][0]
    texts, answers = result.texts[0], result.answers[0]
    i = next((i for i, a in enumerate(answers) if answer is not None and a == answer), 0)
    return texts[i], FINISH[result.rounds[-1].stop_reasons[0][i]]


async def _rsa(server: Server, request: Request, body: ChatRequest):
    search, settings, prompt_tokens = await asyncio.to_thread(_rsa_search, server, body)
    server.reserve(search.population, param="rsa.population")
    meta = _meta(server, "chat.completion")
    timing = Timing(request.state.received)

    def final(result) -> tuple[str, str, dict]:
        usage = _usage({"prompt_tokens": prompt_tokens, "completion_tokens": result.generated_tokens})
        server.metrics.answered(usage, timing)
        return *_rsa_content(result), usage

    if body.stream:
        async def chunks():
            chunk = dict(meta, object="chat.completion.chunk")
            async for kind, value in run_rsa(server.driver, search):
                if kind == "round":
                    t, rnd = value
                    yield dict(chunk, choices=[], rsa_progress={
                        "round": t, "rounds": settings["rounds"], "generated_tokens": rnd.generated_tokens,
                        "seconds": round(rnd.seconds, 3)})
                    continue
                content, finish, usage = final(value)
                yield dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant", "content": content},
                                            "logprobs": None, "finish_reason": finish}],
                           rsa=_rsa_extension(value, settings))
                if body.include_usage():
                    yield dict(chunk, choices=[], usage=usage)

        return _sse(server, search.population, chunks())
    gone = _Disconnect(request)
    try:
        async for kind, value in run_rsa(server.driver, search, gone):
            result = value
    except ClientGone:
        return JSONResponse({}, status_code=499)
    finally:
        gone.close()
        server.release(search.population)
    content, finish, usage = final(result)
    return {**meta, "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None,
                                 "finish_reason": finish}], "usage": usage, "rsa": _rsa_extension(result, settings)}
