"""``zaya generate``: text or token ids in, generated tokens out (streamed, JSON, or a JSONL file through the engine)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

from zaya_jax.cli import add_model_args, model_setting, parse_ids, resolve_model, seed_arg
from zaya_jax.demo import is_demo_model
from zaya_jax.jsonl import iter_objects
from zaya_jax.outputs import OutputLock, check_outputs
from zaya_jax.validate import is_integer

KNOBS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p")
LINE_KEYS = ("prompt", "prompt_ids", "messages")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate continuations (greedy by default) for one prompt or a JSONL file of prompts",
        description="Generate from a prompt given as text (--prompt, needs the model's tokenizer), token ids "
                    "(--prompt-ids) or a JSONL file of prompts (--prompts-file). A single prompt streams its text "
                    "(or ids when there is no tokenizer). A file runs through the engine's slot pool in bounded "
                    "memory and gives one JSON line per prompt, in file order, each written as soon as it and the "
                    "lines before it are done; a bad line gets an error record and the others still run.")
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
    p.add_argument("--max-new-tokens", type=int, default=64,
                   help="new tokens per prompt at most (default 64; clamped to the context: stop reason cache_full)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="keep the smallest set with this much probability (1: off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability (0: off)")
    p.add_argument("--seed", type=seed_arg, default=0, help="line i (0-based, blank lines skipped) samples with key "
                                                       "fold_in(key(seed), i)")
    p.add_argument("--json", action="store_true", help="print one JSON object with tokens, text and stop reason")
    pool = p.add_argument_group("engine (with --prompts-file)")
    pool.add_argument("--slots", type=int, default=16, help="requests decoded together (default 16); memory is set by "
                                                            "slots x max-len")
    pool.add_argument("--max-len", type=int, default=None,
                      help="tokens (prompt + output) a slot holds (default: the file's longest prompt plus the most "
                           "new tokens, rounded up to a power of two, at most the model's context)")
    pool.add_argument("--decode-steps", type=int, default=16, help="decode steps per host round trip (default 16)")
    pool.add_argument("--out", help="write the JSON lines to this file instead of stdout")
    pool.add_argument("--resume", action="store_true", help="keep the lines --out already holds and run the rest")
    pool.add_argument("--force", action="store_true", help="replace an existing --out")
    pool.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_generate_command)


def _generate_command(args) -> int:
    from .generation import generate

    if args.prompts_file:
        return _file_command(args)
    if args.out or args.resume:
        raise ValueError("--out and --resume go with --prompts-file")
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    template_kwargs = {"enable_thinking": False} if args.no_thinking else {}
    line = single_line(args)
    tokenizer = load_tokenizer(args.model, config) if "prompt" in line else _optional_tokenizer(args.model, config)
    chat = is_demo_model(args.model) if args.chat is None else args.chat
    prompts = [_prompt_ids(line, tokenizer, chat, template_kwargs)]
    common = dict(stop_token_ids=None, seed=args.seed, **{k: getattr(args, k) for k in KNOBS})
    if args.json:
        result = generate(params, config, prompts, **common)
        print(json.dumps({"model": desc, "prompt_ids": prompts[0], "tokens": result.tokens[0],
                          "text": _text(tokenizer, result.tokens[0]), "stop_reason": result.stop_reasons[0]}))
    else:
        printer = _StreamPrinter(tokenizer)
        result = generate(params, config, prompts, stream=lambda rows: printer.add(rows[0]), **common)
        printer.finish()
        print(f"[{len(result.tokens[0])} tokens, stop reason: {result.stop_reasons[0]}]", file=sys.stderr)
    if result.stop_reasons[0] == "non_finite":
        print("error: the model produced non-finite (NaN/Inf) logits; its weights are likely corrupt", file=sys.stderr)
        return 1
    return 0


def _file_command(args) -> int:
    """Streams ``--prompts-file`` through an Engine; see ``register``'s description."""
    from tqdm import tqdm

    from .engine import Engine

    path = args.prompts_file
    if not sum(1 for _ in iter_objects(path)):  # the file and --out are checked before the model loads
        raise ValueError(f"{path} holds no prompts")
    _check_out(args)
    config, params, desc = resolve_model(args.model, args.compute_dtype, args.allow_non_finite)
    tokenizer = _optional_tokenizer(args.model, config)
    chat = is_demo_model(args.model) if args.chat is None else args.chat
    template_kwargs = {"enable_thinking": False} if args.no_thinking else {}
    defaults = {k: getattr(args, k) for k in KNOBS}
    total, max_len = _size_pass(path, args, tokenizer, chat, template_kwargs, defaults)
    engine = Engine(params, config, slots=args.slots, max_len=max_len, decode_steps=args.decode_steps)
    run = run_id(args, desc, chat)
    done, lock = _open_out(args, run)  # only now, with every setting checked, is --out locked, replaced or cut
    print(f"model: {desc}; engine: {engine.slots} slots x {engine.max_len} tokens; {total} prompts"
          + (f", {len(done)} already in {args.out}" if done else ""), file=sys.stderr)
    sink = open(args.out, "a", encoding="utf-8") if args.out else sys.stdout
    writer = _InOrderWriter(sink)
    counts = {"error": 0, "non_finite": 0}
    bar = tqdm(total=total, initial=len(done), unit="prompt", disable=args.no_progress or None, file=sys.stderr)
    start = time.perf_counter()

    def finished(n, record):
        writer.put(n, dict(record, run=run))
        bar.update(1)
        counts["non_finite"] += record.get("stop_reason") == "non_finite"

    lines = iter_objects(path)
    index, exhausted = -1, False
    try:
        while True:
            # Read ahead only as far as a window of unwritten lines: memory stays bounded for any file length.
            while not exhausted and writer.pending < 4 * engine.slots:
                try:
                    n, obj = next(lines)
                except StopIteration:
                    exhausted = True
                    break
                index += 1
                if n in done:
                    continue
                writer.expect(n)
                try:
                    if isinstance(obj, Exception):
                        raise obj
                    ids, knobs = _parse_line(obj, f"{path}:{n}", tokenizer, chat, template_kwargs, defaults)
                    engine.submit(engine.check_prompt(ids, f"{path}:{n}: prompt"), seed=args.seed, index=index,
                                  on_update=lambda r, _, n=n: r.done and finished(n, _record(n, r, tokenizer)),
                                  **knobs)
                except ValueError as e:
                    counts["error"] += 1
                    finished(n, {"line": n, "error": str(e)})
            if not engine.busy:
                if exhausted:
                    break
                continue
            engine.step()
            seconds = time.perf_counter() - start
            bar.set_postfix_str(f"{engine.stats()['decode_tokens'] / seconds:.0f} tok/s, {engine.running}/{engine.slots} slots")
    finally:
        bar.close()
        if args.out:
            sink.close()
            lock.close()
    stats = engine.stats()
    print(f"prefix cache: {stats['prefix_hits']} hit(s), {stats['prefix_tokens']:,} of {stats['prompt_tokens']:,} "
          f"prompt tokens served from it; {stats['prefill_tokens']:,} prefilled", file=sys.stderr)
    if counts["error"] or counts["non_finite"]:
        print(f"{counts['error']} line(s) with errors, {counts['non_finite']} with non-finite logits (see their "
              "records)", file=sys.stderr)
    return 2 if counts["error"] else 1 if counts["non_finite"] else 0


def _size_pass(path, args, tokenizer, chat, template_kwargs, defaults) -> tuple[int, int | None]:
    """(prompts in the file, the engine's max_len): --max-len, or else the longest valid prompt plus the most
    new tokens asked for, rounded up to a power of two (the engine caps it at the context)."""
    from .engine import MIN_PROMPT_BUCKET, bucket

    total, need = 0, 1
    for n, obj in iter_objects(path):
        total += 1
        if args.max_len is None and not isinstance(obj, Exception):
            try:
                ids, knobs = _parse_line(obj, f"{path}:{n}", tokenizer, chat, template_kwargs, defaults)
            except ValueError:
                continue  # reported when the line runs
            need = max(need, len(ids) + max(knobs["max_new_tokens"], 1))
    return total, bucket(need, MIN_PROMPT_BUCKET) if args.max_len is None else args.max_len


def _record(n: int, request, tokenizer) -> dict:
    return {"line": n, "tokens": request.tokens, "text": _text(tokenizer, request.tokens),
            "stop_reason": request.stop_reason}


class _InOrderWriter:
    """Writes JSON records in line order as they complete (a finished line waits for the ones before it)."""

    def __init__(self, sink):
        self.sink, self.order, self.ready = sink, [], {}

    @property
    def pending(self) -> int:
        return len(self.order)

    def expect(self, n: int) -> None:
        self.order.append(n)

    def put(self, n: int, record: dict) -> None:
        self.ready[n] = record
        while self.order and self.order[0] in self.ready:
            self.sink.write(json.dumps(self.ready.pop(self.order.pop(0))) + "\n")
        self.sink.flush()


def run_id(args, model_desc: str, chat: bool) -> str:
    """What a --prompts-file run's records depend on, hashed: every record carries it, and --resume
    continues only a file of the same run (the prompts file's bytes, model, chat, seed, knobs, max_len)."""
    with open(args.prompts_file, "rb") as f:
        prompts = hashlib.file_digest(f, "sha256").hexdigest()
    settings = dict(prompts=prompts, model=model_setting(args.model, model_desc), dtype=args.compute_dtype,
                    chat=chat, no_thinking=args.no_thinking, seed=args.seed, max_len=args.max_len,
                    **{k: getattr(args, k) for k in KNOBS})
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _check_out(args) -> None:
    """The flag checks of ``--out`` that need no model: refuses before anything loads."""
    if not args.out:
        if args.resume:
            raise ValueError("--resume needs --out")
        return
    check_outputs({"--out": args.out}, {"--prompts-file": args.prompts_file})
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give a file")
    if os.path.exists(args.out):
        OutputLock(args.out, "--out").close()  # a run writing it now: refused before the model loads
        if os.path.getsize(args.out) and not (args.force or args.resume):
            raise ValueError(f"{args.out} exists: --resume continues it, --force replaces it")


def _open_out(args, run: str) -> tuple[set[int], OutputLock | None]:
    """Locks and prepares ``--out``; returns the line numbers it already holds (with --resume, from records
    of run ``run`` only, each once) and the lock, held until the run ends. A torn last record (a run
    killed mid-write) is cut off; nothing else the user has is replaced without --force."""
    _check_out(args)
    if not args.out:
        return set(), None
    lock = OutputLock(args.out, "--out", create=True)
    try:
        if os.path.getsize(args.out) and not args.resume:  # --force: a new file (other hard links keep the old)
            os.remove(args.out)
            lock, old = OutputLock(args.out, "--out", create=True), lock
            old.close()
        return (_resumed_lines(args, run) if args.resume else set()), lock
    except BaseException:
        lock.close()
        raise


def _resumed_lines(args, run: str) -> set[int]:
    """The line numbers whose records ``--out`` holds, all of run ``run``; cuts off a torn last record."""
    with open(args.out, "rb") as f:
        data = f.read()
    whole = data[: data.rfind(b"\n") + 1]
    torn = data[len(whole):]
    if torn and not torn.startswith(b'{"line": '):
        raise ValueError(f"{args.out}: its last line is neither a whole record nor the start of one of zaya generate; "
                         "not resuming into it")
    done = set()
    for k, line in enumerate(whole.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            record = json.loads(line)
            n, there = int(record["line"]), record["run"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{args.out}:{k} is not a record of zaya generate ({e!r}); not resuming into it") from e
        if there != run:
            raise ValueError(f"{args.out}:{k} comes from another run (run {there}, this one {run}): the prompts file, "
                             "model or settings differ; use another --out, or --force to start over")
        if n in done:
            raise ValueError(f"{args.out}:{k} is a second record of line {n} (two runs wrote the file at once); not "
                             "resuming into it: use another --out, or --force to start over")
        done.add(n)
    if torn:
        with open(args.out, "r+b") as f:
            f.truncate(len(whole))
    return done


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


def single_line(args) -> dict:
    if args.prompt is not None:
        if not args.prompt.strip():
            raise ValueError("--prompt is empty")
        return {"prompt": args.prompt}
    return {"prompt_ids": parse_ids(args.prompt_ids)}


def check_line(obj: dict, where: str, keys=LINE_KEYS, knobs=KNOBS) -> str:
    """Which of ``keys`` holds a prompts-file line's prompt, after checking its keys and the prompt's type;
    raises ValueError naming ``where`` (file:line)."""
    given = [k for k in keys if k in obj]
    if len(given) != 1:
        raise ValueError(f"{where}: each line must be an object with exactly one of {', '.join(keys)}")
    unknown = set(obj) - set(keys) - set(knobs)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {tuple(keys) + tuple(knobs)}")
    key, value = given[0], obj[given[0]]
    if key == "prompt" and not (isinstance(value, str) and value.strip()):
        raise ValueError(f"{where}: \"prompt\" must be a non-empty string, got {value!r:.80}")
    if key == "messages" and not (isinstance(value, list) and value and all(isinstance(m, dict) for m in value)):
        raise ValueError(f"{where}: \"messages\" must be a non-empty list of message objects")
    if key == "prompt_ids" and not (isinstance(value, list) and all(type(t) is int for t in value)):
        raise ValueError(f"{where}: \"prompt_ids\" must be a list of integers")
    return key


def _parse_line(obj: dict, where: str, tokenizer, chat: bool, template_kwargs: dict, defaults: dict):
    """(prompt ids, knobs) of one prompts-file line; raises ValueError naming ``where`` (file:line)."""
    if check_line(obj, where) != "prompt_ids" and tokenizer is None:
        raise ValueError(f"{where}: a text prompt needs the model's tokenizer.json; the model has none (give prompt_ids)")
    knobs = {k: obj.get(k, defaults[k]) for k in KNOBS}
    for k in ("max_new_tokens", "top_k"):
        if not is_integer(knobs[k]):
            raise ValueError(f"{where}: {k} must be an integer, got {knobs[k]!r}")
    for k in ("temperature", "top_p", "min_p"):
        if isinstance(knobs[k], bool) or not isinstance(knobs[k], (int, float)):
            raise ValueError(f"{where}: {k} must be a number, got {knobs[k]!r}")
    from .sampling import check_knobs

    try:
        check_knobs(1, **{k: knobs[k] for k in ("temperature", "top_k", "top_p", "min_p")})
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return _prompt_ids(obj, tokenizer, chat, template_kwargs), knobs


def _prompt_ids(line: dict, tokenizer, chat: bool, template_kwargs: dict) -> list[int]:
    if "prompt_ids" in line:
        return line["prompt_ids"]
    if "messages" in line:
        return tokenizer.encode_chat(line["messages"], **template_kwargs)
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": line["prompt"]}], **template_kwargs)
    return tokenizer.encode(line["prompt"])


def load_tokenizer(model: str | None, config):
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(model)


def _optional_tokenizer(model: str | None, config):
    has_file = os.path.isfile(os.path.join(model, "tokenizer.json"))
    return load_tokenizer(model, config) if has_file else None


def _text(tokenizer, tokens: list[int]) -> str | None:
    return None if tokenizer is None else tokenizer.decode(tokens, skip_special_tokens=True)
