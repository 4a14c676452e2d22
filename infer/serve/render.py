"""What a request's results are answered with: the response models of ``protocol`` (a completion, a chat
completion, their stream chunks, the rsa extension, the model card), built from the events ``jobs``
yields. The last step of a request's path (parse -> validate -> build -> run -> render)."""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Callable

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


def choices(chat: bool, texts: list[str], finish: list[str | None]) -> list:
    """The choices of a whole (not streamed) answer."""
    if chat:
        return [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=f)
                for i, (t, f) in enumerate(zip(texts, finish))]
    return [CompletionChoice(index=i, text=t, finish_reason=f) for i, (t, f) in enumerate(zip(texts, finish))]


async def stream_chunks(events, header: Header, usage: dict, rows: int, include_usage: bool,
                        answered: Callable[[list[int]], None]) -> AsyncIterator[Completion]:
    """The chunks of a streamed completion from ``generate_choices``'s events; ``answered(tokens used per
    choice)`` once the last has been sent, then the usage chunk when asked for."""
    if header.chat:  # OpenAI opens every choice with its role
        for i in range(rows):
            yield header.chunk([ChatChunkChoice(index=i, delta=Delta(role="assistant", content=""),
                                                finish_reason=None)])
    used = [0] * rows
    async for i, delta, reason, tokens in events:
        used[i] = tokens
        choice = (ChatChunkChoice(index=i, delta=Delta(content=delta or None), finish_reason=reason) if header.chat
                  else CompletionChoice(index=i, text=delta, finish_reason=reason))
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
