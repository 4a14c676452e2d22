"""A parsed request checked against what this server can run: a 400 naming the field (``APIError``),
before anything is tokenized, reserved or queued. Steps: ``protocol`` parses, this module validates,
``build`` makes the engine's (or the search's) inputs, ``jobs`` runs them, ``render`` answers."""

from __future__ import annotations

from ..logprobs import check_count
from ..rsa_config import MODES
from ..sampling import check_knobs
from .protocol import APIError, ChatRequest


def check_model(body, model_id: str) -> None:
    if body.model != model_id:
        raise APIError(400, f"model {body.model!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")


def check_sampling(body) -> None:
    """The sampling knobs as the engine checks them (in float32: a temperature of 1e39 is inf there); a
    400 naming the bad one, before anything reaches the engine's thread."""
    try:
        check_knobs(1, temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p)
    except ValueError as e:
        raise APIError(400, str(e)) from None


def requested_max_tokens(body) -> int | None:
    """The new tokens a request asks for (None: the room left; 0: a completion that echoes its prompt)."""
    chat = getattr(body, "max_completion_tokens", None)
    return body.max_tokens if chat is None else chat


def requested_stop_ids(body, eos_token_id) -> list[int]:
    """The stop ids a generation request asks for: its own, and the model's EOS ids unless ``ignore_eos``."""
    stop_ids = list(body.stop_token_ids or [])
    if not body.ignore_eos:
        stop_ids += [t for t in eos_token_id if t not in stop_ids]
    return stop_ids


def check_generation(body, prompts: list[list[int]], engine) -> None:
    """A completion's knobs for ``prompts`` (token ids) on ``engine``: max_tokens within the context, the
    sampling knobs, the stop ids (the engine's own check: vocabulary, count), penalties and logit bias,
    a response_format without ``ignore_eos``."""
    max_tokens = requested_max_tokens(body)
    room = engine.max_len - max(len(p) for p in prompts)
    if max_tokens is not None and max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} is beyond the context: the prompt has "
                            f"{engine.max_len - room} tokens and the maximum length is {engine.max_len} "
                            f"(at most {room} new tokens)", param="max_tokens")
    check_sampling(body)
    try:
        engine.stop_id_row(requested_stop_ids(body, engine.config.eos_token_id))
    except ValueError as e:
        eos = "" if body.ignore_eos else f" (the EOS ids {list(engine.config.eos_token_id)} included)"
        raise APIError(400, f"stop_token_ids: {e}{eos}", param="stop_token_ids") from None
    penalties = requested_penalties(body)
    try:
        engine.check_penalties(**penalties)
    except ValueError as e:
        raise APIError(400, str(e), param=next((k for k in penalties if str(e).startswith(k)), None)) from None
    if body_format(body) is not None and body.ignore_eos:
        raise APIError(400, "`ignore_eos` cannot be combined with `response_format`: the output ends with an "
                            "end-of-sequence token once it is complete", param="ignore_eos")
    name = "top_logprobs" if isinstance(body, ChatRequest) else "logprobs"
    try:
        check_count(name, requested_logprobs(body)["logprobs"], engine.config.vocab_size)
    except ValueError as e:
        raise APIError(400, str(e), param=name) from None


def requested_logprobs(body) -> dict:
    """``Engine.submit``'s ``logprobs`` and ``prompt_logprobs`` of a request: chat's ``top_logprobs`` (with
    ``logprobs: true``), a completion's ``logprobs``, and with ``echo`` the same for the prompt (also without
    ``logprobs`` when ``max_tokens`` is 0: the engine scores the prompt and emits nothing)."""
    if isinstance(body, ChatRequest):
        return dict(logprobs=(body.top_logprobs or 0) if body.logprobs else None, prompt_logprobs=None)
    prompt = None
    if body.echo and (body.logprobs is not None or body.max_tokens == 0):
        prompt = body.logprobs or 0
    return dict(logprobs=body.logprobs, prompt_logprobs=prompt)


def requested_penalties(body) -> dict:
    """``Engine.submit``'s penalty keyword arguments of a request."""
    return dict(presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
                logit_bias=body.logit_bias_ids())


def body_format(body):
    """The request's ``response_format``, None for plain text."""
    fmt = getattr(body, "response_format", None)
    return None if fmt is None or fmt == {"type": "text"} else fmt


def check_rsa(body: ChatRequest) -> None:
    """An rsa request's shape: one user message (the question), one choice, no generation-only fields,
    sampling knobs the engine takes, a known mode."""
    if len(body.messages) != 1 or body.messages[0].role != "user":
        raise APIError(400, "an rsa request takes exactly one user message: the question", param="messages")
    for name in ("max_tokens", "max_completion_tokens", "stop", "stop_token_ids", "presence_penalty",
                 "frequency_penalty", "logit_bias", "response_format", "logprobs"):
        if getattr(body, name):
            raise APIError(400, f"`{name}` does not apply to an rsa request (use rsa.budget / rsa.final_budget)",
                           param=name)
    if body.n != 1:
        raise APIError(400, "an rsa request returns one choice (n=1)", param="n")
    check_sampling(body)
    if body.rsa.mode is not None and body.rsa.mode not in MODES:
        raise APIError(400, f"unknown rsa mode {body.rsa.mode!r}; one of {sorted(MODES)}", param="rsa.mode")
