"""``zaya generate``: text or token ids in, generated tokens out (streamed, JSON, or JSONL batches)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from zaya_jax.cli import add_model_args, is_demo_model, parse_ids, resolve_model
from zaya_jax.jsonl import read_objects

KNOBS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p")
LINE_KEYS = ("prompt", "prompt_ids", "messages")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate continuations (greedy by default) for one prompt or a JSONL batch",
        description="Generate from a prompt given as text (--prompt, needs the model's tokenizer), token ids "
                    "(--prompt-ids) or a JSONL file of prompts (--prompts-file). A single prompt streams its text "
                    "(or ids when there is no tokenizer); a file gives one JSON line per prompt, in order.")
    add_model_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (tokenized with the model's tokenizer.json)")
    source.add_argument("--prompt-ids", help="comma-separated token ids")
    source.add_argument("--prompts-file", help='JSONL: one {"prompt": TEXT} | {"prompt_ids": [...]} | {"messages": '
                                               '[...]} per line, optionally with per-line max_new_tokens, temperature, '
                                               'top_k, top_p, min_p')
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap text prompts as a user turn in the model's chat template (default: on for the shipped "
                        "demo model, which was trained on chats; off otherwise)")
    p.add_argument("--no-thinking", action="store_true", help="render the chat template with enable_thinking=False")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stop reason")
    p.set_defaults(func=_generate_command)


def _generate_command(args) -> int:
    from .generation import generate

    config, params, desc = resolve_model(args.model, args.dtype)
    template_kwargs = {"enable_thinking": False} if args.no_thinking else {}
    lines = _read_lines(args.prompts_file) if args.prompts_file else [_single_line(args)]
    needs_text = any("prompt" in line or "messages" in line for line in lines)
    tokenizer = _tokenizer(args.model, config) if needs_text else _optional_tokenizer(args.model, config)
    chat = is_demo_model(args.model) if args.chat is None else args.chat
    prompts = [_prompt_ids(line, tokenizer, chat, template_kwargs) for line in lines]
    knobs = {k: [line.get(k, getattr(args, k)) for line in lines] for k in KNOBS}
    common = dict(stop_token_ids=None, seed=args.seed, **knobs)

    if args.prompts_file:
        result = generate(params, config, prompts, **common)
        for i, (tokens, reason) in enumerate(zip(result.tokens, result.stop_reasons)):
            print(json.dumps({"index": i, "tokens": tokens, "text": _text(tokenizer, tokens), "stop_reason": reason}))
        return 0
    if args.json:
        result = generate(params, config, prompts, **common)
        print(json.dumps({"model": desc, "prompt_ids": prompts[0], "tokens": result.tokens[0],
                          "text": _text(tokenizer, result.tokens[0]), "stop_reason": result.stop_reasons[0]}))
        return 0
    printer = _StreamPrinter(tokenizer)
    result = generate(params, config, prompts, stream=lambda rows: printer.add(rows[0]), **common)
    printer.finish()
    print(f"[{len(result.tokens[0])} tokens, stop reason: {result.stop_reasons[0]}]", file=sys.stderr)
    return 0


class _StreamPrinter:
    """Prints a row's text as tokens arrive (decoding the whole row, so merged pieces print right)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def add(self, tokens: list[int]) -> None:
        if not tokens:
            return
        self.tokens += tokens
        if self.tokenizer is None:
            sys.stdout.write("".join(f"{t} " for t in tokens))
        else:
            text = _text(self.tokenizer, self.tokens)
            if text.startswith(self.shown):
                sys.stdout.write(text[len(self.shown):])
                self.shown = text
        sys.stdout.flush()

    def finish(self) -> None:
        if self.tokenizer is not None:
            sys.stdout.write(_text(self.tokenizer, self.tokens)[len(self.shown):])
        sys.stdout.write("\n")
        sys.stdout.flush()


def _single_line(args) -> dict:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return {"prompt": args.prompt}
    return {"prompt_ids": parse_ids(args.prompt_ids)}


def _read_lines(path: str) -> list[dict]:
    lines = []
    for n, line in read_objects(path, what="prompts"):
        given = [k for k in LINE_KEYS if k in line]
        if len(given) != 1:
            raise ValueError(f"{path}:{n}: each line must be an object with exactly one of {', '.join(LINE_KEYS)}")
        unknown = set(line) - set(LINE_KEYS) - set(KNOBS)
        if unknown:
            raise ValueError(f"{path}:{n}: unknown key(s) {sorted(unknown)}; allowed: {LINE_KEYS + KNOBS}")
        lines.append(line)
    return lines


def _prompt_ids(line: dict, tokenizer, chat: bool, template_kwargs: dict) -> list[int]:
    if "prompt_ids" in line:
        return line["prompt_ids"]
    if "messages" in line:
        return tokenizer.encode_chat(line["messages"], **template_kwargs)
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": line["prompt"]}], **template_kwargs)
    return tokenizer.encode(line["prompt"])


def _tokenizer(model: str | None, config):
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(model)


def _optional_tokenizer(model: str | None, config):
    has_file = os.path.isfile(os.path.join(model, "tokenizer.json"))
    return _tokenizer(model, config) if has_file else None


def _text(tokenizer, tokens: list[int]) -> str | None:
    return None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
