"""A validated request made into what runs: prompts as token ids, the engine's keyword arguments, or an
unstarted ``RSASearch`` (its settings an ``RSAConfig``). Tokenizing runs here: call these off the event
loop. Errors the tokenizer or the search's own checks raise are 400s naming the field."""

from __future__ import annotations

import dataclasses

from ..constraints import GrammarError
from ..rsa import RSASearch
from ..rsa_config import KNOBS, RSAConfig
from ..rsa_modes import mode_template, search_config, token_template
from .protocol import APIError, ChatRequest, Message
from .validate import body_format, requested_logprobs, requested_max_tokens, requested_penalties, requested_stop_ids


def completion_list(prompt) -> list:
    """``prompt`` as a non-empty list of prompts (texts or token-id lists), not yet tokenized."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is empty", param="prompt")
    return prompt


def prompt_ids(engine, ids, what: str) -> list[int]:
    try:
        return engine.check_prompt(ids, what)
    except ValueError as e:
        raise APIError(400, str(e), param="prompt" if what.startswith("prompt") else "messages") from None


def completion_prompts(server, prompts: list) -> list[list[int]]:
    return [prompt_ids(server.engine, server.encode(p, f"prompt {i}", "prompt") if isinstance(p, str) else p,
                       f"prompt {i}") for i, p in enumerate(prompts)]


def chat_prompt(server, messages: list[Message]) -> list[int]:
    try:
        text = server.tokenizer.render_chat([{"role": m.role, "content": m.text()} for m in messages])
    except Exception as e:  # a template may raise anything on odd input (raise_exception)
        raise APIError(400, f"cannot render the messages with the model's chat template: {e}",
                       param="messages") from None
    return prompt_ids(server.engine, server.encode(text, "messages", "messages", add_special_tokens=False), "messages")


def engine_knobs(body, prompts: list[list[int]], engine, grammars) -> dict:
    """``Engine.submit``'s keyword arguments for a request checked by ``validate.check_generation``;
    ``grammars()``: the ``GrammarVocabulary`` a ``response_format`` compiles against (may take a while:
    call off the event loop)."""
    room = engine.max_len - max(len(p) for p in prompts)
    stop_ids = requested_stop_ids(body, engine.config.eos_token_id)
    max_tokens = requested_max_tokens(body)
    return dict(max_new_tokens=room if max_tokens is None else max_tokens, temperature=body.temperature,
                top_k=max(body.top_k, 0), top_p=body.top_p, min_p=body.min_p, stop_token_ids=stop_ids,
                **requested_penalties(body), grammar=grammar(body_format(body), engine, grammars, stop_ids),
                **requested_logprobs(body))


def grammar(response_format, engine, grammars, stop_ids):
    """The compiled grammar of ``response_format`` (None for text); a 400 naming what cannot be compiled."""
    if response_format is None:
        return None
    try:
        compiled = grammars().compile(response_format)
        engine.check_grammar(compiled, engine.stop_id_row(stop_ids))
    except (GrammarError, ValueError) as e:
        raise APIError(400, f"response_format: {e}", param="response_format") from None
    return compiled


@dataclasses.dataclass
class RSARequest:
    """What an rsa request runs: the unstarted search, its settings, and its prompt's tokens (the usage)."""

    search: RSASearch
    settings: RSAConfig
    prompt_tokens: int


def rsa_request(server, body: ChatRequest, seed: int) -> RSARequest:
    """The search for a request checked by ``validate.check_rsa``: the preset of ``rsa.mode`` (as ``zaya
    rsa`` picks it for the served model) with the request's fields on top, the aggregation template the
    model gets."""
    opts = body.rsa
    try:
        rsa = search_config(server.model_path, opts.mode, **{k: getattr(opts, k) for k in (*KNOBS, "final_budget")},
                            temperature=body.temperature, top_p=body.top_p, seed=seed)
    except ValueError as e:
        raise APIError(400, f"rsa: {e}", param="rsa") from None
    question = server.encode(body.messages[0].text(), "messages", "messages", add_special_tokens=False)
    try:
        template = token_template(mode_template(server.model_path, opts.mode), rsa.tails, server.tokenizer)
        search = RSASearch(server.engine.config, question, rsa, template=template, tokenizer=server.tokenizer)
    except ValueError as e:
        raise APIError(400, f"rsa: {e}", param="rsa") from None
    if search.max_len > server.engine.max_len:
        raise APIError(400, f"rsa: the search needs a context of {search.max_len} tokens; this server's maximum "
                            f"length is {server.engine.max_len}", param="rsa")
    prompt_tokens = len(template.round0_prefix) + len(question) + len(template.round0_suffix)
    return RSARequest(search, rsa, prompt_tokens)
