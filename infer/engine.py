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
import dataclasses
import heapq
import itertools
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

from . import decode
from .sampling import SamplingParams, check_knobs, seed_key

MIN_PROMPT_BUCKET = 16


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), minimum, 1)
    return 1 << (m - 1).bit_length()


def row_bucket(n: int, cap: int) -> int:
    """Prefill rows for ``n`` distinct prompts: the smallest power of four >= n, at most ``cap`` (itself a
    power of two). Powers of four, not two: each (rows, prompt bucket) pair is a compiled program of
    its own (tens of MiB on XLA:CPU), and halving their number is worth padding a group up to 4x."""
    return min(1 << (2 * -(-(max(int(n), 1) - 1).bit_length() // 2)), cap)


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
    (see ``Request``); None otherwise."""

    tokens: list[list[int]]
    stop_reasons: list[str]
    logprobs: list[np.ndarray] | None = None
    routes: list[np.ndarray] | None = None


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its output so far.

    tokens: emitted tokens (the stop token included when one ended it); stop_reason: None while it
    runs, then "stop_token", "max_new_tokens", "cache_full", "non_finite" or "cancelled".
    Set when it finishes on a recording engine: logprobs [n] float32, each emitted token's log-prob
    under the temperature-scaled model distribution; routes [P + n, L] int32, the route each prompt
    and emitted token took in each layer (-1 for a token never fed back: normally the last one).
    """

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    knobs: dict  # temperature, top_k, top_p, min_p: numpy scalars
    stop_ids: np.ndarray  # [K] int32, -1 padded
    key: np.ndarray  # [2] uint32 key data
    on_update: Callable[["Request", list[int]], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None
    slot: int | None = None
    logprobs: np.ndarray | None = None
    routes: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None


class Engine:
    """Continuous batching over a fixed slot pool (see the module docstring).

    slots: rows decoded together; max_len: tokens (prompt + output) a row holds, default and cap the
    model's context; decode_steps: decode steps per host round trip (at most the cache's slots); moe_impl: the MoE dispatch;
    mesh: a ``zaya_jax.sharding`` mesh the pool is placed on (slots split over its data axes, experts
    as the params are sharded); without one, a mesh set with ``jax.set_mesh`` applies as to any jit; prefill_chunk: prompt tokens per
    prefill call and row; prefill_tokens: tokens (rows x chunk) per prefill call at most; max_stop_ids:
    stop tokens a request may have; record: keep every request's routing and sampled tokens'
    log-probs (``Request.routes`` / ``.logprobs``; RL rollouts replay and score them).
    """

    def __init__(self, params, config: ZayaConfig, *, slots: int = 64, max_len: int | None = None,
                 decode_steps: int = 16, moe_impl: str = "auto", mesh=None, prefill_chunk: int = 512,
                 prefill_tokens: int = 4096, max_stop_ids: int = 16, record: bool = False):
        for name, value in (("slots", slots), ("decode_steps", decode_steps), ("prefill_chunk", prefill_chunk),
                            ("prefill_tokens", prefill_tokens), ("max_stop_ids", max_stop_ids)):
            if not is_integer(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        context = config.max_position_embeddings
        if max_len is None:
            max_len = context
        if not isinstance(max_len, (int, np.integer)) or max_len < 2:
            raise ValueError(f"max_len must be an integer >= 2 (a prompt token and a new one), got {max_len!r}")
        self.params, self.config = params, config
        self.slots, self.max_len = int(slots), min(int(max_len), context)
        self.moe_impl = moe_impl
        self.prefill_chunk = bucket(prefill_chunk)
        self.prefill_tokens = max(int(prefill_tokens), self.prefill_chunk)
        self.max_stop_ids = int(max_stop_ids)
        self.record = bool(record)
        self.mesh = mesh  # None: whatever mesh the caller set with jax.set_mesh applies, as to any jit
        self._dtype = compute_dtype(params)
        # Cache slots: max_len rounded up to a multiple of the prompt bucket, so nearby max_len values
        # share compiled programs (rows still stop at max_len: it is a per-slot limit, not a shape).
        self._cache_len = -(-self.max_len // MIN_PROMPT_BUCKET) * MIN_PROMPT_BUCKET
        # A row takes fewer steps than its cache has slots: more per call would only grow the [slots, steps]
        # token buffer (capped at the cache, not max_len, so nearby max_len values share the decode program).
        self.decode_steps = min(int(decode_steps), self._cache_len)

        def new_state(slots: int):
            return decode.init_slots(init_cache(config, slots, self._cache_len, self._dtype), self.max_stop_ids,
                                     self.record)

        # Every leaf of the state has a slot axis: its bytes are a + b * slots, read off two small shapes.
        one, two = (sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(jax.eval_shape(lambda: new_state(n))))
                    for n in (1, 2))
        check_fits(one + (two - one) * (self.slots - 1), jax.devices() if mesh is None else mesh.devices.flat,
                   f"the engine's slot state ({self.slots:,} slots x {self._cache_len:,} cache tokens)")
        with self._mesh_context():
            state = new_state(self.slots)
            if self.mesh is not None:
                state = jax.device_put(state, self._state_shardings(state))
        self._state = state
        self._free = list(range(self.slots))  # a heap: requests take the lowest free slots (see _decode)
        self._running: dict[int, Request] = {}
        self._waiting: dict[int, collections.deque] = collections.defaultdict(collections.deque)  # bucket -> FIFO
        self._cancel: list[Request] = []  # running requests to stop at the next decode
        self._ids = itertools.count()
        self.stats = collections.Counter()  # tokens, slot_steps, decode_calls, prefill_calls, prefill_rows

    # ------------------------------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], *, max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0,
               min_p=0.0, stop_token_ids=None, seed: int = 0, index: int = 0, key: np.ndarray | None = None,
               on_update: Callable[[Request, list[int]], None] | None = None) -> Request:
        """Queues one request; returns its ``Request`` (filled in as ``step`` runs).

        Its key is ``fold_in(key(seed), index)`` unless ``key`` (key data ``[2]`` uint32) is given.
        ``on_update(request, new_tokens)`` is called from ``step`` whenever it emits tokens or stops.
        ``max_new_tokens`` is clamped to what ``max_len`` leaves ("cache_full" says where).
        """
        prompt = tuple(self.check_prompt(prompt))
        max_new = check_max_new_tokens(max_new_tokens)
        knobs = {k: v[0] for k, v in check_knobs(1, temperature=temperature, top_k=top_k, top_p=top_p,
                                                 min_p=min_p).items()}
        if key is None:
            if not is_integer(index) or not 0 <= index <= 2**32 - 1:
                raise ValueError(f"index must be an integer in [0, {2**32 - 1}], got {index!r}")
            key = request_keys(seed, [index])[0]
        request = Request(id=next(self._ids), prompt=prompt, max_new_tokens=max_new, knobs=knobs,
                          stop_ids=self.stop_id_row(stop_token_ids), key=check_key_data(key), on_update=on_update)
        self._waiting[self._prompt_bucket(len(prompt))].append(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stops ``request`` ("cancelled"): a waiting one at once, a running one at the next step."""
        if request.done:
            return
        for queue in self._waiting.values():
            if request in queue:
                queue.remove(request)
                self._finish(request, decode.CANCELLED, [])
                return
        if request.slot is not None and self._running.get(request.slot) is request:  # not another engine's
            self._cancel.append(request)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._running) or any(self._waiting.values())

    @property
    def cache_bytes(self) -> int:
        """Bytes of the pool's cache: fixed by slots and max_len, whatever the workload."""
        return sum(a.nbytes for a in jax.tree.leaves(self._state.cache))

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def running(self) -> int:
        return len(self._running)

    def step(self) -> None:
        """Admits waiting requests into free slots, then runs ``decode_steps`` steps of the running ones."""
        self._admit()
        if self._running:
            self._decode()

    # ------------------------------------------------------------------------------------------ batch API
    def submit_batch(self, prompts, *, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                     stop_token_ids=None, seed: int = 0, on_update=None) -> list[Request]:
        """Queues ``prompts`` as requests ``0 .. n-1`` (keyed as ``generate``'s rows); every knob is a scalar
        or one value per prompt. All are validated before any is queued."""
        prompts = [self.check_prompt(p, f"prompt {i}") for i, p in enumerate(check_prompt_list(prompts))]
        n = len(prompts)
        knobs = check_knobs(n, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        max_new = np.asarray(max_new_tokens, object)
        if max_new.ndim and max_new.shape != (n,):
            raise ValueError(f"max_new_tokens must be a scalar or have one value per prompt ({n}), got shape "
                             f"{max_new.shape}")
        max_new = [check_max_new_tokens(m) for m in np.broadcast_to(max_new, (n,))]
        self.stop_id_row(stop_token_ids)
        keys = request_keys(seed, np.arange(n))
        return [self.submit(p, max_new_tokens=max_new[i], stop_token_ids=stop_token_ids, key=keys[i],
                            on_update=on_update, **{k: v[i] for k, v in knobs.items()})
                for i, p in enumerate(prompts)]

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
        return GenerationResult(tokens=[r.tokens for r in requests], stop_reasons=[r.stop_reason for r in requests],
                                logprobs=recorded("logprobs"), routes=recorded("routes"))

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
    def _prompt_bucket(self, n: int) -> int:
        return min(bucket(n, MIN_PROMPT_BUCKET), self._cache_len)

    def _rows(self, distinct: int) -> int:
        return row_bucket(distinct, bucket(self.slots))

    def _take_group(self) -> list[Request]:
        """The oldest waiting request and others of its bucket, as many as free slots and
        ``prefill_tokens`` allow (a repeated prompt costs a slot, not a prefill row)."""
        S = min(self._waiting, key=lambda b: self._waiting[b][0].id if self._waiting[b] else float("inf"))
        queue, chunk = self._waiting[S], min(S, self.prefill_chunk)
        group, distinct = [], set()
        while queue and len(group) < len(self._free):
            fresh = queue[0].prompt not in distinct
            if fresh and group and self._rows(len(distinct) + 1) * chunk > self.prefill_tokens:
                break
            distinct.add(queue[0].prompt)
            group.append(queue.popleft())
        if not queue:
            del self._waiting[S]
        return group

    def _admit(self) -> None:
        while self._free and any(self._waiting.values()):
            group = self._take_group()
            if group:
                self._prefill_and_insert(group)

    def _prefill_and_insert(self, group: list[Request]) -> None:
        rows: dict[tuple[int, ...], int] = {}
        for r in group:
            rows.setdefault(r.prompt, len(rows))
        S = self._prompt_bucket(len(group[0].prompt))
        C, G = min(S, self.prefill_chunk), self._rows(len(rows))
        V = self.config.vocab_size
        with self._mesh_context():
            cache = init_cache(self.config, G, S, self._dtype)
            last = jnp.zeros((G, V), jnp.float32)
            routes = np.zeros((G, S, self.config.num_hidden_layers), np.int32) if self.record else None
            longest = max(len(p) for p in rows)
            for start in range(0, longest, C):
                tokens, new_len = np.zeros((G, C), np.int32), np.zeros((G,), np.int32)
                for prompt, g in rows.items():
                    piece = prompt[start:start + C]
                    tokens[g, : len(piece)], new_len[g] = piece, len(piece)
                out = decode.prefill_chunk_compiled(self.params, self.config, cache, jnp.asarray(tokens),
                                                    jnp.asarray(new_len), last, moe_impl=self.moe_impl,
                                                    record=self.record)
                last, cache = out[:2]
                if self.record:
                    # The last chunk may run past a bucket capped at the cache length (S % C != 0).
                    routes[:, start:start + C] = to_host(out[2])[:, :S - start]
                self.stats["prefill_calls"] += 1
            self.stats["prefill_rows"] += len(rows)

            n = self.slots  # one insert program per prefill shape, whatever the group's size
            src, dst = np.zeros((n,), np.int32), np.full((n,), self.slots, np.int32)
            keys, max_new = np.zeros((n, 2), np.uint32), np.ones((n,), np.int32)
            limit = np.full((n,), self.max_len, np.int32)
            stop_ids = np.full((n, self.max_stop_ids), -1, np.int32)
            knobs = {k: np.zeros((n,), np.asarray(v).dtype) for k, v in group[0].knobs.items()}
            for i, r in enumerate(group):
                r.slot = heapq.heappop(self._free)
                src[i], dst[i], keys[i], stop_ids[i] = rows[r.prompt], r.slot, r.key, r.stop_ids
                max_new[i] = min(r.max_new_tokens, np.iinfo(np.int32).max)
                for k, v in r.knobs.items():
                    knobs[k][i] = v
            self._state, first, reason = decode.insert_compiled(
                self._state, cache, last, jnp.asarray(src), jnp.asarray(dst), jnp.int32(len(group)),
                jax.random.wrap_key_data(keys),
                SamplingParams(**{k: jnp.asarray(v) for k, v in knobs.items()}), jnp.asarray(max_new),
                jnp.asarray(limit), jnp.asarray(stop_ids), None if routes is None else jnp.asarray(routes))
        first, reason = to_host(first), to_host(reason)
        for r in group:
            self._running[r.slot] = r
        self._advance_all([(r, [] if reason[i] == decode.NON_FINITE else [int(first[i])], int(reason[i]))
                           for i, r in enumerate(group)])

    def _advance_all(self, updates: list[tuple[Request, list[int], int]]) -> None:
        """``_advance`` of every (request, new tokens, reason). An ``on_update`` that raises is re-raised only
        once all are advanced: the device has moved every slot on, so no other request may miss its tokens."""
        error = None
        for update in updates:
            try:
                self._advance(*update)
            except Exception as e:  # noqa: BLE001 (re-raised below)
                error = error or e
        if error is not None:
            raise error

    def _decode(self) -> None:
        # By request, not slot: one cancelled here may have finished since, and its slot gone to another.
        cancel = np.zeros((self.slots,), bool)
        cancel[[slot for slot, r in self._running.items() if any(r is c for c in self._cancel)]] = True
        self._cancel.clear()
        # Requests sit in the lowest slots: decode only the smallest power-of-two window holding them all.
        active = min(bucket(max(self._running) + 1), self.slots)
        with self._mesh_context():
            self._state, out = decode.decode_compiled(self.params, self.config, self._state, jnp.asarray(cancel),
                                                      steps=self.decode_steps, active=active, moe_impl=self.moe_impl)
        out, reason = to_host(out), to_host(self._state.reason)
        emitted = out >= 0
        self.stats["decode_calls"] += 1
        self.stats["slot_steps"] += self.slots * int(emitted.any(axis=0).sum())
        self.stats["tokens"] += int(emitted.sum())
        self._advance_all([(r, out[slot][emitted[slot]].tolist(), int(reason[slot]))
                           for slot, r in list(self._running.items())])

    def _advance(self, request: Request, new: list[int], reason: int) -> None:
        request.tokens += new
        if reason != decode.RUNNING and self.record:
            n, P = len(request.tokens), len(request.prompt)
            request.routes = to_host(self._state.routes[request.slot, : P + n])
            request.logprobs = to_host(self._state.logprobs[request.slot, P: P + n])
        if reason != decode.RUNNING:
            del self._running[request.slot]
            heapq.heappush(self._free, request.slot)
            self._finish(request, reason, new)
        elif new and request.on_update is not None:
            request.on_update(request, new)

    def _finish(self, request: Request, reason: int, new: list[int]) -> None:
        request.stop_reason = decode.STOP_REASONS[reason]
        if request.on_update is not None:
            request.on_update(request, new)

    # ------------------------------------------------------------------------------------------ placement
    def _mesh_context(self):
        import contextlib

        return jax.set_mesh(self.mesh) if self.mesh is not None else contextlib.nullcontext()

    def _state_shardings(self, state: decode.SlotState):
        rows = lambda a: shd.batch_sharding(self.mesh, a.ndim, batch=a.shape[0])  # noqa: E731
        return state.replace(cache=shd.cache_shardings(state.cache, self.config, self.mesh),
                             **{f: jax.tree.map(rows, getattr(state, f))
                                for f in ("token", "num_new", "reason", "keys", "sampling", "max_new", "limit",
                                          "stop_ids", "routes", "logprobs")})


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


def check_max_new_tokens(value) -> int:
    """``max_new_tokens`` as a positive int (any size: the engine clamps it to the context)."""
    if not is_integer(value) or value < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {value!r}")
    return int(value)
