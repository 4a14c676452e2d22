"""The OpenAI request bodies the server accepts and the response bodies it sends (pydantic), and its
error object.

Values must have the JSON type of their field (strict: no "5" for 5, no true for 1). Unknown fields are
ignored, as OpenAI-compatible servers do; fields we know but cannot honour
(best_of, suffix, tools) get a 400 naming them unless they hold their neutral value.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal, Union

import pydantic
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from ..logprobs import TOP_LOGPROBS
from ..penalties import PENALTY_LIMIT
from ..sampling import SEED_MAX, SEED_MIN
from ..tokenizer import CHAT_ROLES

MAX_STOP_STRINGS = 4  # OpenAI's limit
MAX_N = 64
MAX_RSA_ROUNDS = 32  # a search past its client runs its rounds out (each submitted, then cancelled)
# Fields we know but do not implement: a request may send them only with their neutral value.
UNSUPPORTED = ("best_of", "suffix", "tools")


class APIError(Exception):
    """An HTTP error carrying OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=-1)  # extension (vLLM): -1 or 0 disables
    min_p: float = Field(default=0.0, ge=0, le=1)  # extension (vLLM)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = Field(default=None)  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM): generate past the model's end-of-sequence tokens
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    presence_penalty: float = Field(default=0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    frequency_penalty: float = Field(default=0.0, ge=-PENALTY_LIMIT, le=PENALTY_LIMIT)
    logit_bias: dict[str, float] | None = None  # token id (a decimal string) -> bias in [-100, 100]

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise APIError(400, f"{len(stops)} stop strings; at most {MAX_STOP_STRINGS}", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def logit_bias_ids(self) -> dict[int, float] | None:
        """``logit_bias`` keyed by token id; a 400 for a key that is not a decimal token id."""
        if self.logit_bias is None:
            return None
        bad = [k for k in self.logit_bias if not (k.isascii() and k.isdigit())]
        if bad:
            raise APIError(400, f"logit_bias keys must be token ids (decimal strings), got {bad[0]!r}",
                           param="logit_bias")
        ids = {int(k): v for k, v in self.logit_bias.items()}
        if len(ids) < len(self.logit_bias):
            raise APIError(400, "logit_bias names a token id twice (as different strings)", param="logit_bias")
        return ids

    def check_supported(self) -> None:
        for name in UNSUPPORTED:
            given = getattr(self, name, None)
            if given not in (None, False, 0, {}, [], {"type": "text"}) and not (name == "best_of" and given == 1):
                raise APIError(400, f"`{name}` is not supported by this server (got {given!r})", param=name)


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt alone
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens=0 generates nothing: it needs echo=true (the prompt, scored with "
                                "logprobs)", param="max_tokens")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal[CHAT_ROLES]
    content: Union[str, list[ContentPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class RSAOptions(BaseModel):
    """The Markov RSA extension of chat completions: a preset (``mode``) and/or explicit knobs."""

    model_config = ConfigDict(extra="forbid")
    mode: str | None = None
    population: int | None = None
    tails: int | None = None
    rounds: int | None = Field(default=None, ge=0, le=MAX_RSA_ROUNDS)
    budget: int | None = None
    tail_tokens: int | None = None
    final_budget: int | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (constraints.py checks it)
    rsa: RSAOptions | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")


def parse(model: type[BaseModel], body: bytes, limit: int):
    """``body`` as ``model``; an APIError(400) naming the field for anything malformed or over ``limit`` bytes."""
    if len(body) > limit:
        raise APIError(400, f"request body of {len(body)} bytes is over the limit of {limit} bytes",
                       code="body_too_large")
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        request = model.model_validate(data, strict=True)  # JSON types as sent: no "5" -> 5, true -> 1
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"invalid `{param}`: {first['msg']}" if param else first["msg"], param=param) from None
    request.check_supported()
    return request


# ---------------------------------------------------------------------------------------------- responses
class _Response(BaseModel):
    """A response body: ``model_dump()`` is the JSON sent. Fields named in ``OMIT_IF_NONE`` are left out
    when None (OpenAI's optional members); every other field is always sent, null included."""

    model_config = ConfigDict(extra="forbid")
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _omit(self, handler):
        return {k: v for k, v in handler(self).items() if not (v is None and k in self.OMIT_IF_NONE)}


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(_Response):
    """A completion choice's log-probs (``logprob_json``): one entry per token in each list."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    """A chat choice's (or chunk's) log-probs (``logprob_json``)."""

    content: list[ChatTokenLogprob] | None


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class Delta(_Response):
    OMIT_IF_NONE = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None


class RSARoundInfo(_Response):
    round: int
    generated_tokens: int
    seconds: float


class RSAProgress(RSARoundInfo):
    """A streamed rsa request's event as each round ends."""

    rounds: int


class RSAExtension(_Response):
    """The Markov RSA result a chat completion with ``rsa`` carries beside its choice."""

    answer: str | None
    share: float
    answers: list[str | None]
    texts: list[str]
    generated_tokens: int
    settings: dict[str, int]
    rounds: list[RSARoundInfo]


class Completion(_Response):
    """A (chat) completion, or one chunk of a streamed one (``object`` says which)."""

    OMIT_IF_NONE = ("usage", "rsa", "rsa_progress")
    id: str
    object: Literal["text_completion", "chat.completion", "chat.completion.chunk"]
    created: int
    model: str
    choices: list[CompletionChoice] | list[ChatChoice] | list[ChatChunkChoice]
    usage: Usage | None = None
    rsa: RSAExtension | None = None  # extension: the search's result
    rsa_progress: RSAProgress | None = None  # extension: a streamed search's round


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
