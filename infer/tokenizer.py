"""The model directory's tokenizer and chat template, without transformers.

``tokenizer.json`` is loaded with the ``tokenizers`` library; the chat template (``chat_template.jinja``
or the ``chat_template`` entry of ``tokenizer_config.json``) is rendered with jinja2 the way
transformers' ``apply_chat_template`` renders it: a sandboxed environment with ``trim_blocks`` and
``lstrip_blocks``, loop controls, a ``tojson`` filter that does not escape HTML, ``raise_exception``
and ``strftime_now``; the named special tokens (``bos_token``, ``eos_token``, ...) and any extra
keyword (``enable_thinking``, ``tools``, ...) are template variables; message keys set to None are
dropped and a message's reasoning is given under all of its names. The rendered text is tokenized without adding special tokens (the template writes them).
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

CHAT_ROLES = ("system", "developer", "user", "assistant")  # the roles a chat's messages may have
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """A model directory whose tokenizer or chat template cannot be used; the message says why."""


class Tokenizer:
    """Text <-> token ids and chat rendering for one model directory."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, special_tokens: Mapping[str, str],
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """Loads ``tokenizer.json`` plus, when present, ``tokenizer_config.json``,
        ``special_tokens_map.json`` and ``chat_template.jinja`` from a model directory."""
        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise TokenizerError(f"{path} has no tokenizer.json: give token ids (--prompt-ids) or a model directory "
                                 "with a tokenizer")
        try:
            tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:  # the tokenizers library raises its own exception types
            raise TokenizerError(f"cannot read {file}: {e}") from e
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
        special = {}
        for source in (_read_json(os.path.join(path, "special_tokens_map.json")), config):
            for name in SPECIAL_TOKEN_NAMES:
                value = _token_text(source.get(name))
                if value is not None:
                    special[name] = value
        template_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(template_file):
            with open(template_file, encoding="utf-8") as f:
                template = f.read()
        else:
            template = _default_template(config.get("chat_template"), file)
        return cls(tok, special, template)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def longest_token(self) -> int:
        """Characters of the vocabulary's longest entry, added tokens included: no token spells more, so
        text of ``n`` characters is at least ``n / longest_token`` tokens."""
        return max(map(len, self.tokenizer.get_vocab(with_added_tokens=True)), default=1)

    def encode(self, text: str, add_special_tokens: bool = True, max_tokens: int | None = None) -> list[int]:
        """Token ids of ``text``. Text the vocabulary cannot spell becomes the unknown token, as in
        transformers, when that token is a dedicated one (``<unk>``); when the fallback is another special
        token (the demo's is ``<pad>``) the character is refused instead (TokenizerError naming it), as is a
        lone surrogate (not a character). With ``max_tokens``, text too long to fit in that many tokens is
        refused by its length alone, before any tokenizing (whose memory grows with the text)."""
        if max_tokens is not None and len(text) > max_tokens * self.longest_token:
            raise TokenizerError(f"the text has {len(text):,} characters: at least {-(-len(text) // self.longest_token):,} "
                                 f"tokens (no token spells more than {self.longest_token} characters), more than the "
                                 f"{max_tokens:,} that fit")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"the text holds a lone surrogate {text[e.start]!r} (character {e.start}), which is "
                                 "not a character; remove or replace it") from None
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        unknown = self._borrowed_unknown_id()
        if unknown is not None:
            for token, (start, end) in zip(encoding.ids, encoding.offsets):
                if token == unknown and text[start:end] != self.tokenizer.id_to_token(unknown):
                    raise TokenizerError(f"the tokenizer has no token for {text[start:end]!r} (character {start} "
                                         f"of the text); remove or replace it")
        return encoding.ids

    def _borrowed_unknown_id(self) -> int | None:
        """The id text outside the vocabulary falls back to, if that token also serves another role."""
        name = getattr(self.tokenizer.model, "unk_token", None)
        roles = {text for role, text in self.special_tokens.items() if role != "unk_token"}
        return self.tokenizer.token_to_id(name) if name in roles else None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, name: str) -> int | None:
        """The id of a named special token (e.g. ``"eos_token"``), or None."""
        text = self.special_tokens.get(name)
        return None if text is None else self.tokenizer.token_to_id(text)

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    **template_kwargs) -> str:
        """The chat template applied to ``messages`` (``enable_thinking=...`` and the like go in kwargs)."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        if not messages or any(not isinstance(m, Mapping) for m in messages):
            raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
        messages = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.special_tokens, **template_kwargs}
        return _compile(self.chat_template).render(
            messages=messages, tools=variables.pop("tools", None), documents=variables.pop("documents", None),
            add_generation_prompt=add_generation_prompt, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                    max_tokens: int | None = None, **template_kwargs) -> list[int]:
        """Token ids of the rendered chat (no special tokens added beyond what the template writes);
        ``max_tokens`` as ``encode``'s."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
        return self.encode(text, add_special_tokens=False, max_tokens=max_tokens)


def _alias_reasoning(message: dict) -> dict:
    """A message's reasoning under every name templates read it by (as transformers does)."""
    reasoning = next((message[k] for k in REASONING_FIELDS if k in message), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _read_json(file: str) -> dict:
    if not os.path.isfile(file):
        return {}
    with open(file, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{file} is not valid JSON: {e}") from e


def _token_text(value) -> str | None:
    """A special token given as a string or as an AddedToken-style ``{"content": ...}`` dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value if isinstance(value, str) else None


def _default_template(template, source: str) -> str | None:
    """``tokenizer_config.json``'s ``chat_template``: a string, or a list of named templates."""
    if template is None or isinstance(template, str):
        return template
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        if "default" in named:
            return named["default"]
        raise TokenizerError(f"chat templates next to {source} are named {sorted(named)} but none is 'default'")
    raise TokenizerError(f"`chat_template` next to {source} must be a string or a list, got {type(template).__name__}")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


_COMPILED: dict[str, jinja2.Template] = {}


def _compile(template: str) -> jinja2.Template:
    if template not in _COMPILED:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            _COMPILED[template] = env.from_string(template)
        except jinja2.exceptions.TemplateSyntaxError as e:
            raise TokenizerError(f"the chat template does not parse: {e}") from e
    return _COMPILED[template]
