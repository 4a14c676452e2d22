"""What a request's results are answered with: the response models of ``protocol`` (a completion, a chat
completion, their stream chunks, the rsa extension, the model card), built from the events ``jobs``
yields. The last step of a request's path (parse -> validate -> build -> run -> render)."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable, Sequence

from .jobs import ChoiceEvent
from .logprob_json import CompletionLogprobs, chat_logprobs
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    Completion,
    CompletionChoice,
    Delta,
    ModelCard,
    RSAExtension,
    RSAProgress,
    RSARoundInfo,
    Usage,
)
from .text import FINISH


class Header:
    """The members every body of one response shares: id, created, model; ``chat`` or text completion."""

    def __init__(self, model_id: str, chat: bool):
        self.chat = chat
        self.fields = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                           model=model_id)

    def body(self, choices: list, **extra) -> Completion:
        return Completion(object="chat.completion" if self.chat else "text_completion", choices=choices,
                          **self.fields, **extra)

    def chunk(self, choices: list, **extra) -> Completion:
        return Completion(object="chat.completion.chunk" if self.chat else "text_completion", choices=choices,
                          **self.fields, **extra)


class ChoiceRendering:
    """What a generation request's ``ChoiceEvent``s become: each choice's text (after its echoed prompt: the
    text as given, token ids decoded) and its ``logprobs`` object (``logprob_json``; None when not asked).
    ``decode``: token ids -> the text shown; ``token_text``: one token's own string."""

    def __init__(self, body, prompts: list[list[int]], echo: Sequence | None, chat: bool,
                 decode: Callable[[Sequence[int]], str], token_text: Callable[[int], str]):
        self.prompts, self.n, self.chat, self.token_text = prompts, body.n, chat, token_text
        self.asked = bool(body.logprobs) if chat else body.logprobs is not None
        self.echo = None if echo is None else [p if isinstance(p, str) else decode(ids) for p, ids in zip(echo, prompts)]
        self.opened: set[int] = set()
        self.completion = [CompletionLogprobs(token_text) for _ in range(len(prompts) * body.n)]

    def text(self, event: ChoiceEvent) -> str:
        """The event's text, after the echoed prompt on a choice's first event."""
        first = event.index not in self.opened
        self.opened.add(event.index)
        return (self.echo[event.index // self.n] if self.echo is not None and first else "") + event.text

    def logprobs(self, event: ChoiceEvent) -> dict | None:
        """The event's piece of its choice's ``logprobs`` (the echoed prompt's first, on its first event)."""
        if not self.asked:
            return None
        if self.chat:
            return chat_logprobs(event.logprobs, self.token_text)
        items = [(e.token, e) for e in event.logprobs]
        if self.echo is not None and event.prompt_logprobs is not None:
            items = list(zip(self.prompts[event.index // self.n], event.prompt_logprobs)) + items
        return self.completion[event.index].piece(items)

    @staticmethod
    def join(whole: dict | None, piece: dict | None) -> dict | None:
        """A choice's ``logprobs`` so far with the next piece appended."""
        return piece if whole is None else {k: whole[k] + piece[k] for k in whole}


def choices(chat: bool, texts: list[str], finish: list[str | None], logprobs: list[dict | None]) -> list:
    """The choices of a whole (not streamed) answer."""
    if chat:
        return [ChatChoice(index=i, message=AssistantMessage(content=t), logprobs=lp, finish_reason=f)
                for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs))]
    return [CompletionChoice(index=i, text=t, logprobs=lp, finish_reason=f)
            for i, (t, f, lp) in enumerate(zip(texts, finish, logprobs))]


async def stream_chunks(events, header: Header, usage: dict, rows: int, include_usage: bool,
                        answered: Callable[[list[int]], None], rendering: ChoiceRendering
                        ) -> AsyncIterator[Completion]:
    """The chunks of a streamed completion from ``generate_choices``'s events; ``answered(tokens used per
    choice)`` once the last has been sent, then the usage chunk when asked for."""
    if header.chat:  # OpenAI opens every choice with its role
        for i in range(rows):
            yield header.chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""),
                                                finish_reason=None)])
    used = [0] * rows
    async for event in events:
        i, reason = event.index, event.finish_reason
        used[i] = event.tokens_used
        text, logprobs = rendering.text(event), rendering.logprobs(event)
        choice = (ChatChunkChoice(index=i, delta=Delta(content=text or None), logprobs=logprobs, finish_reason=reason)
                  if header.chat else CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=reason))
        yield header.chunk([choice])
    answered(used)
    if include_usage:
        yield header.chunk([], usage=Usage.of(**usage))


def model_card(model_id: str, created: int, max_len: int) -> ModelCard:
    return ModelCard(id=model_id, created=created, owned_by="zaya-jax", max_model_len=max_len)


# ------------------------------------------------------------------------------------------------ Markov RSA
def rsa_settings(rsa) -> dict[str, int]:
    """The settings an rsa answer reports: the search's shape, its final budget and seed."""
    return dict(rsa.knobs, final_budget=rsa.round_budget(rsa.rounds), seed=rsa.seed)


def rsa_extension(result, rsa) -> RSAExtension:
    answer, share = result.majority[0]
    return RSAExtension(answer=answer, share=share, answers=result.answers[0], texts=result.texts[0],
                        generated_tokens=result.generated_tokens, settings=rsa_settings(rsa),
                        rounds=[RSARoundInfo(round=t, generated_tokens=r.generated_tokens, seconds=round(r.seconds, 3))
                                for t, r in enumerate(result.rounds)])


def rsa_progress(t: int, rnd, rounds: int) -> RSAProgress:
    return RSAProgress(round=t, rounds=rounds, generated_tokens=rnd.generated_tokens, seconds=round(rnd.seconds, 3))


def rsa_content(result) -> tuple[str, str]:
    """The final text of the first member whose answer is the majority's (the first text if none), and its
    finish reason ("length" when the budget cut it)."""
    answer = result.majority[0][0]
    texts, answers = result.texts[0], result.answers[0]
    i = next((i for i, a in enumerate(answers) if answer is not None and a == answer), 0)
    return texts[i], FINISH[result.rounds[-1].stop_reasons[0][i]]
