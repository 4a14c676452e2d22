"""The engine: a fixed pool of slots that requests stream through (continuous batching).

``Engine`` owns a ``decode.SlotState`` of ``slots`` rows x ``max_len`` cache slots; its memory is set
by those two numbers, never by the number of requests or by ``max_new_tokens`` (a request stops with
"cache_full" when prompt + output reach ``max_len``). The host scheduler:

1. admit: while slots are free, take the oldest waiting request's prompt-length bucket, gather the
   waiting requests of that bucket (up to the free slots and ``prefill_tokens``), prefill each distinct
   prompt once (in chunks of ``prefill_chunk`` tokens), and insert it into one slot per request (prefix
   sharing: requests with the same prompt copy one prefill);
2. decode: ``decode_steps`` steps of every running slot in one compiled call; finished requests leave
   and free their slots for the next admit.

A request's tokens depend only on its prompt, its knobs and its key (``fold_in(key(seed), index)``, as
``generate`` keys row ``index``): not on its slot, its batch company or the slot count.

Not thread-safe: one thread drives it (``step``, or ``generate`` / ``stream``, which step until done).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax import sharding as shd
from zaya_jax.cache import init_cache
from zaya_jax.config import ZayaConfig
from zaya_jax.host import to_host
from zaya_jax.memory import check_fits
from zaya_jax.model import compute_dtype
from zaya_jax.validate import is_integer

from . import constraints, decode
from . import logprobs as lps
from . import penalties as pen
from .sampling import SamplingParams, check_knobs, per_row, seed_key
from .scheduler import (
    MIN_PROMPT_BUCKET,
    PREFIX_BLOCK,
    DecodeBatch,
    Group,
    PenaltyKnobs,
    PoolSizes,
    Request,
    SamplingKnobs,
    Scheduler,
    StopReason,
    bucket,
)

log = logging.getLogger("zaya.engine")


def request_keys(seed: int, indices) -> np.ndarray:
    """Key data ``[n, 2]`` uint32 of requests ``indices`` under ``seed``: ``fold_in(seed_key(seed), index)``,
    the key ``generate`` gives row ``index``. ValueError for a seed ``seed_key`` refuses."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(seed_key(seed), jnp.asarray(indices, jnp.uint32))
    return np.asarray(jax.random.key_data(keys))


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """New tokens per prompt (stop token included when one ended the row) and why each row stopped:
    "stop_token", "max_new_tokens", "cache_full" (prompt + output reached the maximum length) or
    "non_finite" (the model produced NaN/Inf logits: the row stops there, without a token).
    From a recording engine (``Engine(record=True)``) also each request's ``logprobs`` and ``routes``
    (see ``Request``); None otherwise. When asked (``logprobs=`` / ``prompt_logprobs=``), each request's
    ``token_logprobs`` / ``prompt_logprobs`` (see ``Request``); None otherwise."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    logprobs: list[np.ndarray] | None = None
    routes: list[np.ndarray] | None = None
    token_logprobs: list[list[lps.TokenLogprob]] | None = None
    prompt_logprobs: list[list[lps.TokenLogprob | None]] | None = None


class PoolShape(PoolSizes):
    """The static sizes of a slot pool (``scheduler.PoolSizes``) and the device state they fix.

    ``cache_len`` is ``max_len`` rounded up to a multiple of the smallest prompt bucket, so nearby
    ``max_len`` values share programs (rows still stop at ``max_len``); ``decode_steps`` is capped at it.
    """

    @classmethod
    def of(cls, config: ZayaConfig, *, slots: int = 64, max_len: int | None = None, decode_steps: int = 16,
           prefill_chunk: int = 512, prefill_tokens: int = 4096, max_stop_ids: int = 16,
           record: bool = False, penalties: bool = True,
           max_logit_bias: int = pen.MAX_LOGIT_BIAS) -> PoolShape:
        """The pool ``Engine(params, config, **these)`` builds; ValueError naming a bad setting."""
        for name, value in (("slots", slots), ("decode_steps", decode_steps), ("prefill_chunk", prefill_chunk),
                            ("prefill_tokens", prefill_tokens), ("max_stop_ids", max_stop_ids)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not is_integer(max_logit_bias) or max_logit_bias < 0:
            raise ValueError(f"max_logit_bias must be an integer >= 0, got {max_logit_bias!r}")
        context = config.max_position_embeddings
        if max_len is None:
            max_len = context
        if not is_integer(max_len) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 (a prompt token and a new one), got {max_len!r}")
        max_len = min(int(max_len), context)
        cache_len = -(-max_len // MIN_PROMPT_BUCKET) * MIN_PROMPT_BUCKET
        chunk = bucket(prefill_chunk)
        # A row takes fewer steps than its cache has slots: more per call would only grow the [slots, steps]
        # token buffer (capped at the cache, not max_len, so nearby max_len values share the decode program).
        return cls(slots=int(slots), max_len=max_len, cache_len=cache_len,
                   decode_steps=min(int(decode_steps), cache_len), prefill_chunk=chunk,
                   prefill_tokens=max(int(prefill_tokens), chunk), max_stop_ids=int(max_stop_ids),
                   record=bool(record), penalties=bool(penalties),
                   max_logit_bias=int(max_logit_bias) if penalties else 0)

    def new_state(self, config: ZayaConfig, dtype) -> decode.SlotState:
        """An idle pool of ``dtype`` cache values (call under ``jax.eval_shape`` for its shapes alone)."""
        return decode.init_slots(init_cache(config, self.slots, self.cache_len, dtype), self.max_stop_ids, self.record,
                                 (config.vocab_size, self.max_logit_bias) if self.penalties else None)

    def state_bytes(self, config: ZayaConfig, dtype) -> int:
        """Bytes of the pool, from two one- and two-slot shapes (every leaf has a slot axis: a + b x slots)."""
        one, two = (sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(
            lambda: dataclasses.replace(self, slots=n).new_state(config, dtype)))) for n in (1, 2))
        return one + (two - one) * (self.slots - 1)


class Engine:
    """Continuous batching over a fixed slot pool (see the module docstring).

    slots: rows decoded together; max_len: tokens (prompt + output) a row holds, default and cap the
    model's context; decode_steps: decode steps per host round trip (at most the cache's slots); moe_impl: the MoE dispatch;
    mesh: a ``zaya_jax.sharding`` mesh the pool is placed on (slots split over its data axes, experts
    as the params are sharded); without one, a mesh set with ``jax.set_mesh`` applies as to any jit; prefill_chunk: prompt tokens per
    prefill call and row; prefill_tokens: tokens (rows x chunk) per prefill call at most; max_stop_ids:
    stop tokens a request may have; record: keep every request's routing and sampled tokens'
    log-probs (``Request.routes`` / ``.logprobs``; RL rollouts replay and score them); penalties: keep the
    state presence / frequency penalties and logit bias need (``penalties.py``: ``slots x vocab`` int32
    counts), max_logit_bias: logit-bias entries a request may have; prefix_cache: keep
    prompts' keys, values and CCA states in blocks of ``PREFIX_BLOCK`` tokens, so a prompt that starts
    like an earlier one prefills only the rest (``scheduler.PrefixCache``; off on a recording engine or
    a mesh); prefix_cache_tokens: its size in tokens, evicted least recently used (default: a quarter of
    the pool's ``slots x max_len``; ``prefix_cache_bytes`` says what it takes).
    """

    def __init__(self, params, config: ZayaConfig, *, slots: int = 64, max_len: int | None = None,
                 decode_steps: int = 16, moe_impl: str = "auto", mesh=None, prefill_chunk: int = 512,
                 prefill_tokens: int = 4096, max_stop_ids: int = 16, record: bool = False, prefix_cache: bool = True,
                 prefix_cache_tokens: int | None = None, penalties: bool = True,
                 max_logit_bias: int = pen.MAX_LOGIT_BIAS):
        pool = PoolShape.of(config, slots=slots, max_len=max_len, decode_steps=decode_steps,
                            prefill_chunk=prefill_chunk, prefill_tokens=prefill_tokens, max_stop_ids=max_stop_ids,
                            record=record, penalties=penalties, max_logit_bias=max_logit_bias)
        self.pool, self.params, self.config = pool, params, config
        self.slots, self.max_len, self.decode_steps = pool.slots, pool.max_len, pool.decode_steps
        self.prefill_chunk, self.prefill_tokens = pool.prefill_chunk, pool.prefill_tokens
        self.max_stop_ids, self.record, self._cache_len = pool.max_stop_ids, pool.record, pool.cache_len
        self.moe_impl = moe_impl
        self.mesh = mesh  # None: whatever mesh the caller set with jax.set_mesh applies, as to any jit
        self._dtype = compute_dtype(params)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = pool.slots * pool.cache_len // 4
        elif not is_integer(prefix_cache_tokens) or prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens must be an integer >= 0, got {prefix_cache_tokens!r}")
        blocks = prefix_cache_tokens // PREFIX_BLOCK if prefix_cache and not record and mesh is None else 0
        store = lambda: init_cache(config, blocks, PREFIX_BLOCK, self._dtype)  # noqa: E731
        self.prefix_cache_bytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(store)))
        check_fits(pool.state_bytes(config, self._dtype) + self.prefix_cache_bytes,
                   jax.devices() if mesh is None else mesh.devices.flat,
                   f"the engine's slot state ({self.slots:,} slots x {self._cache_len:,} cache tokens) with its "
                   f"prefix cache ({blocks * PREFIX_BLOCK:,} tokens)")
        with self._mesh_context():
            state = pool.new_state(config, self._dtype)
            if self.mesh is not None:
                state = jax.device_put(state, state_shardings(state, config, mesh))
        self._state = state
        self._store = store() if blocks else None
        # The pool's zeros are written here, not behind the first step: dispatched asynchronously, the
        # max_len-sized fill (1.33 GiB for bench-124M at 16 x 8192 with its prefix cache) ran inside the
        # first requests' prefill and decode.
        jax.block_until_ready((self._state, self._store))
        self._scheduler = Scheduler(pool, blocks)
        self._ids = itertools.count()
        self._counts: collections.Counter = collections.Counter()  # see stats()

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], *, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
               min_p=0.0, stop_token_ids=None, seed: int = 0, index: int = 0, key: np.ndarray | None = None,
               on_update: Callable[[Request, list[int]], None] | None = None, presence_penalty=0.0,
               frequency_penalty=0.0, logit_bias=None, grammar: constraints.Grammar | None = None,
               logprobs: int | None = None, prompt_logprobs: int | None = None) -> Request:
        """Queues one request; returns its ``Request`` (filled in as ``step`` runs).

        Its key is ``fold_in(key(seed), index)`` unless ``key`` (key data ``[2]`` uint32) is given.
        ``on_update(request, new_tokens)`` is called from ``step`` whenever it emits tokens or stops.
        ``max_new_tokens`` is clamped to what ``max_len`` leaves ("cache_full" says where).
        ``presence_penalty`` and ``frequency_penalty`` (in [-2, 2]) and ``logit_bias`` ({token id: bias in
        [-100, 100]}, at most ``max_logit_bias`` entries) act as OpenAI's (``penalties.py``). ``grammar``
        (``constraints.GrammarVocabulary.compile``) restricts each token to those that keep the output
        inside it; its end-of-sequence ids must be stop tokens of the request.
        ``logprobs`` / ``prompt_logprobs`` (None, or 0 to ``logprobs.TOP_LOGPROBS`` alternatives per token):
        fill ``Request.token_logprobs`` / ``.prompt_logprobs`` with the model's log-probs; with
        ``prompt_logprobs``, ``max_new_tokens`` may be 0 (score the prompt, emit nothing).
        """
        prompt = tuple(self.check_prompt(prompt))
        V = self.config.vocab_size
        logprobs, prompt_logprobs = (lps.check_count("logprobs", logprobs, V),
                                     lps.check_count("prompt_logprobs", prompt_logprobs, V))
        max_new = check_max_new_tokens(max_new_tokens, scoring=prompt_logprobs is not None)
        knobs = SamplingKnobs(**{k: v[0] for k, v in check_knobs(1, temperature=temperature, top_k=top_k,
                                                                 top_p=top_p, min_p=min_p).items()},
                              logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        penalty = self.check_penalties(presence_penalty, frequency_penalty, logit_bias)
        stop_ids = self.stop_id_row(stop_token_ids)
        self.check_grammar(grammar, stop_ids)
        if key is None:
            if not is_integer(index) or not 0 <= index <= 2**32 - 1:
                raise ValueError(f"index must be an integer in [0, {2**32 - 1}], got {index!r}")
            key = request_keys(seed, [index])[0]
        request = Request(id=next(self._ids), prompt=prompt, max_new_tokens=max_new, sampling=knobs,
                          stop_ids=stop_ids, key=check_key_data(key), on_update=on_update, penalties=penalty,
                          matcher=None if grammar is None else grammar.matcher())
        self._scheduler.add(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stops ``request`` ("cancelled"): a waiting one at once, a running one at the next step."""
        if not request.done and self._scheduler.cancel(request):
            self._finish(request, StopReason.CANCELLED, [])

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._scheduler.running or self._scheduler.waiting)

    @property
    def cache_bytes(self) -> int:
        """Bytes of the pool's cache: fixed by slots and max_len, whatever the workload."""
        return sum(a.nbytes for a in jax.tree.leaves(self._state.cache))

    @property
    def waiting(self) -> int:
        return self._scheduler.waiting_count

    @property
    def running(self) -> int:
        return len(self._scheduler.running)

    def stats(self) -> dict:
        """Counters since construction: ``requests`` admitted and their ``prompt_tokens``; ``prefill_tokens``
        run through prefill (a prompt shared by several requests once, less what the prefix cache held);
        ``prefix_hits`` (prefills that started from the prefix cache) and the ``prefix_tokens`` loaded from
        it; ``decode_steps`` and ``decode_tokens`` (tokens they emitted; each request's first token comes from
        its prefill); ``slot_utilisation`` = decode_tokens / (slots x decode_steps); ``prefill_calls``,
        ``prefill_rows``, ``decode_calls``."""
        out = {k: self._counts[k] for k in ("requests", "prompt_tokens", "prefill_tokens", "prefix_hits",
                                            "prefix_tokens", "decode_steps", "decode_tokens", "prefill_calls",
                                            "prefill_rows", "decode_calls")}
        steps = out["decode_steps"]
        out["slot_utilisation"] = out["decode_tokens"] / (self.slots * steps) if steps else 0.0
        return out

    def step(self) -> None:
        """Runs the scheduler's plan: prefills waiting requests into free slots, then ``decode_steps`` steps
        of the running ones. An ``on_update`` that raises is re-raised once the whole plan has run: the
        device has moved every slot on, so no other request may miss its tokens."""
        plan = self._scheduler.schedule()
        errors = [self._prefill_and_insert(group) for group in plan.groups]
        if plan.decode is not None and self._scheduler.running:
            errors.append(self._decode(plan.decode))
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error

    # ------------------------------------------------------------------------------------------ batch API
    def submit_batch(self, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                     stop_token_ids=None, seed: int = 0, on_update=None, presence_penalty=0.0, frequency_penalty=0.0,
                     logit_bias=None, grammar: constraints.Grammar | None = None, logprobs: int | None = None,
                     prompt_logprobs: int | None = None) -> list[Request]:
        """Queues ``prompts`` as requests ``0 .. n-1`` (keyed as ``generate``'s rows); every knob is a scalar
        or one value per prompt (``logit_bias``, ``grammar``, ``logprobs`` and ``prompt_logprobs``: one for
        all). All are validated before any is queued.

        The batch is queued longest budget first (``min(max_new_tokens, max_len - prompt length)``, ties in
        input order): a request's tokens do not depend on its slot or company, so only the order in which
        requests finish changes, and the longest ones no longer start last and run on in a nearly empty
        pool (bench-124M, 256 prompts with 8-256 new tokens: see docs/benchmarks.md)."""
        prompts = [self.check_prompt(p, f"prompt {i}") for i, p in enumerate(check_prompt_list(prompts))]
        n = len(prompts)
        knobs = check_knobs(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        presence = per_row("presence_penalty", presence_penalty, n, np.float64)
        frequency = per_row("frequency_penalty", frequency_penalty, n, np.float64)
        for p, f in zip(presence, frequency):
            self.check_penalties(p, f, logit_bias)
        self.check_grammar(grammar, self.stop_id_row(stop_token_ids))
        V = self.config.vocab_size
        reports = dict(logprobs=lps.check_count("logprobs", logprobs, V),
                       prompt_logprobs=lps.check_count("prompt_logprobs", prompt_logprobs, V))
        max_new = np.asarray(max_new_tokens, object)
        if max_new.ndim and max_new.shape != (n,):
            raise ValueError(f"max_new_tokens must be a scalar or have one value per prompt ({n}), got shape "
                             f"{max_new.shape}")
        max_new = [check_max_new_tokens(m, scoring=reports["prompt_logprobs"] is not None)
                   for m in np.broadcast_to(max_new, (n,))]
        self.stop_id_row(stop_token_ids)
        keys = request_keys(seed, np.arange(n))
        budget = [min(m, self.max_len - len(p)) for m, p in zip(max_new, prompts)]
        requests = {i: self.submit(prompts[i], max_new_tokens=max_new[i], stop_token_ids=stop_token_ids, key=keys[i],
                                   on_update=on_update, presence_penalty=presence[i], frequency_penalty=frequency[i],
                                   logit_bias=logit_bias, grammar=grammar, **reports,
                                   **{k: v[i] for k, v in knobs.items()})
                    for i in sorted(range(n), key=lambda i: -budget[i])}
        return [requests[i] for i in range(n)]

    def stream(self, prompts, **kwargs) -> Iterator[tuple[int, list[int], str]]:
        """Yields ``(index, tokens, stop_reason)`` for each prompt as it finishes; arguments as
        ``submit_batch`` (``generate``'s knobs)."""
        for index, r in self._finished(prompts, **kwargs):
            yield index, r.tokens, r.stop_reason

    def generate(self, prompts, **kwargs):
        """All of ``stream``'s results in input order, as a ``GenerationResult``."""
        out = dict(self._finished(prompts, **kwargs))
        requests = [out[i] for i in range(len(out))]
        recorded = lambda field: [getattr(r, field) for r in requests] if self.record else None  # noqa: E731
        asked = lambda knob, field: [getattr(r, field) for r in requests] if kwargs.get(knob) is not None else None  # noqa: E731
        return GenerationResult(tokens=[r.tokens for r in requests], stop_reasons=[r.stop_reason for r in requests],
                                logprobs=recorded("logprobs"), routes=recorded("routes"),
                                token_logprobs=asked("logprobs", "token_logprobs"),
                                prompt_logprobs=asked("prompt_logprobs", "prompt_logprobs"))

    def _finished(self, prompts, **kwargs) -> Iterator[tuple[int, Request]]:
        """Yields ``(index, request)`` for each prompt as it finishes."""
        finished: collections.deque = collections.deque()
        requests = self.submit_batch(prompts, on_update=lambda r, _: r.done and finished.append(r), **kwargs)
        index = {r: i for i, r in enumerate(requests)}
        try:
            while index:
                self.step()
                while finished:
                    r = finished.popleft()
                    yield index.pop(r), r
        finally:  # a consumer that stops early leaves nothing of its own in the pool
            for r in index:
                self.cancel(r)
            while any(r.slot is not None and not r.done for r in index):
                self.step()

    # ------------------------------------------------------------------------------------------ checks
    def check_prompt(self, prompt, what: str = "prompt") -> list[int]:
        """``prompt`` as a list of ints; raises ValueError naming ``what`` and the problem."""
        ids = np.asarray(token_id_list(prompt, what))
        if ids.size == 0:
            raise ValueError(f"{what} is empty: a prompt needs at least one token")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"{what} has token id(s) {sorted(set(bad.tolist()))[:8]} outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if ids.size >= self.max_len:
            raise ValueError(f"{what} has {ids.size} tokens; the maximum length (prompt + new tokens) is "
                             f"{self.max_len}, which leaves no room to generate")
        return ids.tolist()

    def check_penalties(self, presence_penalty=0.0, frequency_penalty=0.0, logit_bias=None) -> PenaltyKnobs:
        """The penalty knobs of one request; ValueError naming a bad one (or any, on an engine without
        penalties)."""
        knobs = PenaltyKnobs(presence=pen.check_penalty("presence_penalty", presence_penalty),
                             frequency=pen.check_penalty("frequency_penalty", frequency_penalty),
                             logit_bias=pen.check_logit_bias(logit_bias, self.config.vocab_size,
                                                             self.pool.max_logit_bias if self.pool.penalties else 0))
        if knobs != PenaltyKnobs() and not self.pool.penalties:
            raise ValueError("this engine has no penalty state (Engine(penalties=False)): presence_penalty, "
                             "frequency_penalty and logit_bias must be left at 0 / None")
        return knobs

    def check_grammar(self, grammar, stop_ids: np.ndarray) -> None:
        """ValueError unless ``grammar`` is None or a ``constraints.Grammar`` for this vocabulary whose
        end-of-sequence ids are all among ``stop_ids`` (the grammar ends the output on one of them)."""
        if grammar is None:
            return
        if not isinstance(grammar, constraints.Grammar):
            raise ValueError(f"grammar must be a constraints.Grammar (GrammarVocabulary.compile), got "
                             f"{type(grammar).__name__}")
        if grammar.vocab_size != self.config.vocab_size:
            raise ValueError(f"the grammar was compiled for a vocabulary of {grammar.vocab_size} tokens; the model "
                             f"has {self.config.vocab_size}")
        missing = sorted(set(grammar.eos_ids) - set(stop_ids.tolist()))
        if missing:
            raise ValueError(f"a grammar ends its output with an end-of-sequence token: {missing} must be among "
                             "the request's stop token ids")

    def stop_id_row(self, stop_token_ids=None) -> np.ndarray:
        """Stop ids ``[max_stop_ids]`` int32 padded with -1; None means the config's EOS ids. Each given id
        must be an integer inside the vocabulary."""
        if stop_token_ids is None:
            stops = list(self.config.eos_token_id)
        elif isinstance(stop_token_ids, (str, bytes)) or not isinstance(stop_token_ids, (Sequence, np.ndarray, jax.Array)):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {stop_token_ids!r}")
        else:
            stops = stop_token_ids.tolist() if hasattr(stop_token_ids, "tolist") else list(stop_token_ids)
            V = self.config.vocab_size
            for t in stops:
                if not is_integer(t) or not 0 <= t < V:
                    raise ValueError(f"stop token id {t!r} is not a token id in the vocabulary [0, {V})")
        if len(stops) > self.max_stop_ids:
            raise ValueError(f"{len(stops)} stop token ids; at most {self.max_stop_ids} (Engine max_stop_ids)")
        out = np.full((self.max_stop_ids,), -1, np.int32)
        out[: len(stops)] = stops
        return out

    # ------------------------------------------------------------------------------------------ scheduler
    def _prefill_and_insert(self, group: Group) -> Exception | None:
        """Runs ``group``'s prefill and starts its requests in their slots; returns an ``on_update`` error."""
        S, C, G = group.bucket, group.chunk, group.rows
        V = self.config.vocab_size
        every = PREFIX_BLOCK if self._store is not None else 0
        with self._mesh_context():
            cache = init_cache(self.config, G, S, self._dtype)
            if any(p.cached for p in group.prefills):
                table, count = np.zeros((G, S // PREFIX_BLOCK), np.int32), np.zeros((G,), np.int32)
                for g, p in enumerate(group.prefills):
                    table[g, : len(p.cached)], count[g] = p.cached, len(p.cached)
                cache = decode.load_prefix_compiled(cache, self._store, jnp.asarray(table), jnp.asarray(count))
            last = jnp.zeros((G, V), jnp.float32)
            routes = np.zeros((G, S, self.config.num_hidden_layers), np.int32) if self.record else None
            rest = [p.prompt[p.start:] for p in group.prefills]
            scored = [] if group.score else None  # each chunk's prompt log-probs (host)
            states = []
            for start in range(0, max(len(r) for r in rest), C):
                tokens, new_len = np.zeros((G, C), np.int32), np.zeros((G,), np.int32)
                targets = np.zeros((G, C), np.int32) if group.score else None
                for g, r in enumerate(rest):
                    piece = r[start:start + C]
                    tokens[g, : len(piece)], new_len[g] = piece, len(piece)
                    if targets is not None:  # the token after each: the last prompt token's is never read
                        after = r[start + 1:start + C + 1]
                        targets[g, : len(after)] = after
                out = decode.prefill_chunk_compiled(self.params, self.config, cache, jnp.asarray(tokens),
                                                    jnp.asarray(new_len), last, moe_impl=self.moe_impl,
                                                    record=self.record, state_every=every,
                                                    targets=None if targets is None else jnp.asarray(targets))
                last, cache = out[:2]
                if self.record:
                    # The last chunk may run past a bucket capped at the cache length (S % C != 0).
                    routes[:, start:start + C] = to_host(out[2])[:, :S - start]
                if scored is not None:
                    scored.append(jax.tree.map(to_host, out[2 + self.record]))
                if every:
                    states.append(out[-1])
                self._counts["prefill_calls"] += 1
            saves = [(g, j, p.start // PREFIX_BLOCK, b) for g, p in enumerate(group.prefills) for j, b in p.save]
            if saves:
                n = G * (S // PREFIX_BLOCK)  # one save program per prefill shape
                index = np.zeros((4, n), np.int32)
                index[3] = self._store.k.shape[1]  # padding: dropped
                index[:, : len(saves)] = np.asarray(saves, np.int32).T
                joined = tuple(jnp.concatenate(parts, axis=2) for parts in zip(*states))
                self._store = decode.save_prefix_compiled(self._store, cache, joined, *map(jnp.asarray, index))
            self._count_prefill(group)
            self._scheduler.prefilled(group)

            n = self.slots  # one insert program per prefill shape, whatever the group's size
            src, dst = np.zeros((n,), np.int32), np.full((n,), self.slots, np.int32)
            keys, max_new = np.zeros((n, 2), np.uint32), np.ones((n,), np.int32)
            limit = np.full((n,), self.max_len, np.int32)
            stop_ids = np.full((n, self.max_stop_ids), -1, np.int32)
            knobs = {f.name: np.zeros((n,), np.asarray(getattr(group.requests[0].sampling, f.name)).dtype)
                     for f in dataclasses.fields(SamplingParams)}
            for i, (r, row) in enumerate(zip(group.requests, group.row_of)):
                src[i], dst[i], keys[i], stop_ids[i] = row, r.slot, r.key, r.stop_ids
                max_new[i] = min(max(r.max_new_tokens, 1), np.iinfo(np.int32).max)  # 0: the slot stops at once
                for k, values in knobs.items():
                    values[i] = getattr(r.sampling, k)
            wanted = any(r.sampling.logprobs is not None for r in group.requests)
            self._state, first, reason, first_lp = decode.insert_compiled(
                self._state, cache, last, jnp.asarray(src), jnp.asarray(dst), jnp.int32(len(group.requests)),
                jax.random.wrap_key_data(keys),
                SamplingParams(**{k: jnp.asarray(v) for k, v in knobs.items()}), jnp.asarray(max_new),
                jnp.asarray(limit), jnp.asarray(stop_ids), None if routes is None else jnp.asarray(routes),
                self._penalty_rows(group.requests, n), self._token_masks(group.requests, n), jnp.asarray(wanted))
        first, reason = to_host(first), to_host(reason)
        first_lp = jax.tree.map(to_host, first_lp) if wanted else None
        if scored is not None:
            scored = jax.tree.map(lambda *chunks: np.concatenate(chunks, axis=1), *scored)
        updates = []
        for i, (r, row) in enumerate(zip(group.requests, group.row_of)):
            if r.sampling.prompt_logprobs is not None:  # a scored row starts at token 0: chunk positions are prompt positions
                P = len(r.prompt)
                r.prompt_logprobs = [None] + lps.entries(r.prompt[1:], scored.chosen[row, :P - 1],
                                                         scored.top_ids[row, :P - 1], scored.top_values[row, :P - 1],
                                                         r.sampling.prompt_logprobs)
            new, why = ([] if reason[i] == StopReason.NON_FINITE else [int(first[i])]), int(reason[i])
            if r.max_new_tokens == 0:  # scoring only: the token drawn is dropped
                new, why = [], (why if why == StopReason.NON_FINITE else StopReason.MAX_NEW_TOKENS)
            entries = None
            if new and r.sampling.logprobs is not None:
                entries = lps.entries(new, first_lp.chosen[i:i + 1], first_lp.top_ids[i:i + 1],
                                      first_lp.top_values[i:i + 1], r.sampling.logprobs)
            updates.append((r, new, why, entries))
        return self._advance_all(updates)

    def _count_prefill(self, group: Group) -> None:
        cached = sum(p.start for p in group.prefills)
        self._counts.update(requests=len(group.requests), prompt_tokens=sum(len(r.prompt) for r in group.requests),
                            prefill_rows=len(group.prefills), prefix_tokens=cached,
                            prefill_tokens=sum(len(p.prompt) for p in group.prefills) - cached,
                            prefix_hits=sum(p.start > 0 for p in group.prefills))

    def _advance_all(self, updates: list[tuple[Request, list[int], int, list | None]]) -> Exception | None:
        """``_advance`` of every (request, new tokens, reason, their log-probs or None); returns the first
        error an ``on_update`` raised (the caller re-raises it once every slot's tokens are handed over)."""
        error = None
        for update in updates:
            try:
                self._advance(*update)
            except Exception as e:  # noqa: BLE001 (re-raised by step)
                error = error or e
        return error

    def _penalty_rows(self, requests: list[Request], n: int) -> pen.Penalties | None:
        """The penalty knobs of ``requests`` as ``[n]`` rows (padding neutral), on a pool with penalties."""
        if not self.pool.penalties:
            return None
        K = self.pool.max_logit_bias
        presence, frequency = np.zeros((n,), np.float32), np.zeros((n,), np.float32)
        bias_ids, bias = np.full((n, K), -1, np.int32), np.zeros((n, K), np.float32)
        for i, r in enumerate(requests):
            presence[i], frequency[i] = r.penalties.presence, r.penalties.frequency
            if r.penalties.logit_bias:
                ids, values = zip(*r.penalties.logit_bias)
                bias_ids[i, : len(ids)], bias[i, : len(ids)] = ids, values
        return pen.Penalties(presence=jnp.asarray(presence), frequency=jnp.asarray(frequency),
                             bias_ids=jnp.asarray(bias_ids), bias=jnp.asarray(bias))

    def _token_masks(self, requests: list[Request | None], n: int) -> jax.Array | None:
        """``[n, ceil(V / 32)]`` int32 next-token masks, row i from ``requests[i]``'s grammar (all tokens for
        rows without one); None when no request has a grammar."""
        rows = [(r.matcher, i) for i, r in enumerate(requests) if r is not None and r.matcher is not None]
        if not rows:
            return None
        masks = np.full((n, constraints.mask_width(self.config.vocab_size)), -1, np.int32)
        constraints.fill_masks(rows, masks)
        return jnp.asarray(masks)

    def _decode(self, batch: DecodeBatch) -> Exception | None:
        cancel = np.zeros((self.slots,), bool)
        cancel[batch.cancel] = True
        wanted = any(r.sampling.logprobs is not None for r in self._scheduler.running.values())
        # A grammar's mask depends on the token before: while a constrained request runs, one step per call.
        running = self._scheduler.running
        masks = self._token_masks([running.get(slot) for slot in range(self.slots)], self.slots)
        with self._mesh_context():
            self._state, out, lp = decode.decode_compiled(
                self.params, self.config, self._state, jnp.asarray(cancel), masks, jnp.asarray(wanted),
                steps=1 if masks is not None else self.decode_steps, active=batch.active, span=batch.span,
                moe_impl=self.moe_impl)
        out, reason = to_host(out), to_host(self._state.reason)
        lp = jax.tree.map(to_host, lp) if wanted else None  # transferred only when some row asks
        emitted = out >= 0
        self._counts.update(decode_calls=1, decode_steps=int(emitted.any(axis=0).sum()),
                            decode_tokens=int(emitted.sum()))
        updates = []
        for slot, r in list(self._scheduler.running.items()):
            kept, entries = emitted[slot], None
            new = out[slot][kept].tolist()
            if r.sampling.logprobs is not None:
                entries = lps.entries(new, lp.chosen[slot][kept], lp.top_ids[slot][kept], lp.top_values[slot][kept],
                                      r.sampling.logprobs)
            updates.append((r, new, int(reason[slot]), entries))
        return self._advance_all(updates)

    def _advance(self, request: Request, new: list[int], reason: int, entries: list | None = None) -> None:
        request.tokens += new
        if entries:
            request.token_logprobs += entries
        if request.matcher is not None and not all(request.matcher.consume_token(t) for t in new):
            # The mask allows only tokens the grammar accepts; this is a bug, and the request cannot go on.
            log.error("request %d: its grammar refused a token it allowed: %s", request.id, request.matcher.get_error())
            if reason == StopReason.RUNNING:
                self._scheduler.cancel(request)
        if reason != StopReason.RUNNING and self.record:
            n, P = len(request.tokens), len(request.prompt)
            request.routes = to_host(self._state.routes[request.slot, : P + n])
            request.logprobs = to_host(self._state.logprobs[request.slot, P: P + n])
        if reason != StopReason.RUNNING:
            self._scheduler.finish(request)
            self._finish(request, reason, new)
        elif new and request.on_update is not None:
            request.on_update(request, new)

    def _finish(self, request: Request, reason: int, new: list[int]) -> None:
        request.stop_reason = StopReason(reason).label
        if request.on_update is not None:
            request.on_update(request, new)

    # ------------------------------------------------------------------------------------------ placement
    def _mesh_context(self):
        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()


def state_shardings(state: decode.SlotState, config: ZayaConfig, mesh) -> decode.SlotState:
    """Shardings of a slot pool on ``mesh``: rows over ``data`` and ``expert`` (``sharding.SLOT_POOL``), or over
    ``data`` alone when the slots do not divide over both; K/V heads as ``sharding.cache_shardings``.
    ``state`` may be abstract."""
    slots = state.token.shape[0]
    rules = shd.SLOT_POOL if slots % (mesh.shape["data"] * mesh.shape["expert"]) == 0 else shd.INFERENCE
    rows = lambda a: shd.batch_sharding(mesh, a.ndim, rules, batch=a.shape[0])  # noqa: E731
    return state.replace(cache=shd.cache_shardings(state.cache, config, mesh, rules),
                         **{f: jax.tree.map(rows, getattr(state, f)) for f in decode.PER_SLOT})


def token_id_list(prompt, what: str = "prompt") -> list[int]:
    """``prompt`` as a list of ints: a flat sequence of integer ids (not text, floats or bools, which ``int``
    would coerce); ValueError naming ``what``."""
    ids = np.asarray(prompt)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"{what} must be a flat sequence of integer token ids (encode text with a tokenizer)")
    return ids.tolist()


def check_key_data(key) -> np.ndarray:
    """``key`` as key data ``[2]`` uint32 (``jax.random.key_data`` of one threefry key); ValueError otherwise."""
    data = np.asarray(key)
    if data.shape != (2,) or not np.issubdtype(data.dtype, np.integer) or (data < 0).any() or (data > 2**32 - 1).any():
        raise ValueError(f"key must be key data [2] of uint32 (jax.random.key_data of one key), got {data.dtype} "
                         f"{list(data.shape)}")
    return data.astype(np.uint32)


def check_prompt_list(prompts) -> list:
    """``prompts`` as a non-empty list of prompts; raises ValueError otherwise."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray, jax.Array)):
        raise ValueError("prompts must be a sequence of token-id sequences (use a tokenizer for text)")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one prompt")
    return list(prompts)


def check_max_new_tokens(value, scoring: bool = False) -> int:
    """``max_new_tokens`` as a positive int (any size: the engine clamps it to the context), or 0 for a
    request that only scores its prompt (``scoring``: it asks prompt log-probs)."""
    if not is_integer(value) or value < (0 if scoring else 1):
        raise ValueError(f"max_new_tokens must be an integer >= 1 (0 only with prompt_logprobs), got {value!r}")
    return int(value)
