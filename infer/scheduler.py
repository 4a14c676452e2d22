"""The engine's scheduling policy in plain Python (no JAX): what to prefill, where, and what to decode.

``Scheduler.schedule()`` returns a ``Plan``: admission groups (each a prefill of distinct prompts into
the slots it assigns, with the blocks each prompt loads from and saves into the prefix cache) and the
decode batch (the slot window, the cache span it attends over, the slots to cancel). The engine runs
the plan's device programs and reports back: ``prefilled(group)`` once a group's prefill is done,
``finish(request)`` when a request stops.

Admission: while slots are free, take the oldest waiting request's prompt-length bucket and gather
the waiting requests of that bucket, up to the free slots and the pool's ``prefill_tokens``; each
distinct prompt is one prefill row, and requests with the same prompt share it. Requests take the
lowest free slots, so the decode window ``[0, active)`` stays small when few run.

The prefix cache (``PrefixCache``) is a trie of ``PREFIX_BLOCK``-token blocks over a fixed number of
device blocks, each holding its tokens' keys and values and the CCA state (conv frames, delayed value)
at its end. A prompt starts from its longest cached run of whole blocks (always leaving one token to
prefill: its logits start the request) and saves its other whole blocks. Blocks in use by a plan are
pinned; the least recently used unpinned leaf is evicted when a block is needed.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import heapq
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    from .logprobs import TokenLogprob

MIN_PROMPT_BUCKET = 16
PREFIX_BLOCK = MIN_PROMPT_BUCKET  # tokens per prefix-cache block; prompt buckets are multiples of it


def bucket(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    m = max(int(n), minimum, 1)
    return 1 << (m - 1).bit_length()


def row_bucket(n: int, cap: int) -> int:
    """Prefill rows for ``n`` distinct prompts: the smallest power of four >= n, at most ``cap`` (itself a
    power of two). Powers of four, not two: each (rows, prompt bucket) pair is a compiled program of
    its own (tens of MiB on XLA:CPU), and halving their number is worth padding a group up to 4x."""
    return min(1 << (2 * -(-(max(int(n), 1) - 1).bit_length() // 2)), cap)


class StopReason(enum.IntEnum):
    """Why a slot stopped, as the device programs store it (IDLE: no request has used the slot yet).
    ``label`` is the name requests and results carry; ``finish_reason`` OpenAI's word for it."""

    RUNNING = 0
    STOP_TOKEN = 1
    MAX_NEW_TOKENS = 2
    CACHE_FULL = 3
    NON_FINITE = 4
    CANCELLED = 5
    IDLE = 6

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's ``finish_reason`` ("error" and "abort" are vLLM's words for non-finite and cancelled)."""
        return _FINISH.get(self)

    @classmethod
    def of(cls, label: str) -> StopReason:
        return cls[label.upper()]


_FINISH = {StopReason.STOP_TOKEN: "stop", StopReason.MAX_NEW_TOKENS: "length", StopReason.CACHE_FULL: "length",
           StopReason.NON_FINITE: "error", StopReason.CANCELLED: "abort"}


@dataclasses.dataclass(frozen=True)
class SamplingKnobs:
    """One request's sampling knobs (validated by ``sampling.check_knobs``): temperature (0: greedy),
    top_k (0: off), top_p, min_p; and what it reports (``logprobs.check_count``): logprobs, the log-prob of
    each emitted token with that many alternatives (None: none), prompt_logprobs, the same for each prompt
    token after the first."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclasses.dataclass(frozen=True)
class PenaltyKnobs:
    """One request's presence and frequency penalties and logit bias, as (token id, bias) pairs (validated by
    ``penalties.check_penalty`` and ``check_logit_bias``)."""

    presence: float = 0.0
    frequency: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(eq=False)
class Request:
    """One generation request and its output so far.

    tokens: emitted tokens (the stop token included when one ended it); stop_reason: None while it
    runs, then "stop_token", "max_new_tokens", "cache_full", "non_finite" or "cancelled".
    Set when it finishes on a recording engine: logprobs [n] float32, each emitted token's log-prob
    under the temperature-scaled model distribution; routes [P + n, L] int32, the route each prompt
    and emitted token took in each layer (-1 for a token never fed back: normally the last one).
    With ``sampling.logprobs``: token_logprobs, one ``TokenLogprob`` per emitted token as it is emitted
    (the model's log-probs, see ``zaya_jax.infer.logprobs``). With ``sampling.prompt_logprobs``:
    prompt_logprobs, set once prefilled, None for the first prompt token and a ``TokenLogprob`` for each
    other. max_new_tokens may be 0 with prompt_logprobs: the prompt is scored and nothing emitted.
    penalties: its presence / frequency penalties and logit bias; matcher: the parser of its grammar
    (``constraints.Grammar.matcher()``), which decides the tokens it may emit next, or None.
    """

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingKnobs
    stop_ids: np.ndarray  # [K] int32, -1 padded
    key: np.ndarray  # [2] uint32 key data
    on_update: Callable[["Request", list[int]], None] | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    stop_reason: str | None = None
    slot: int | None = None
    logprobs: np.ndarray | None = None
    routes: np.ndarray | None = None
    token_logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    penalties: PenaltyKnobs = PenaltyKnobs()
    matcher: object | None = None

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def held(self) -> int:
        """Tokens in its slot's cache: the prompt and every emitted token but the last (fed at the next step)."""
        return len(self.prompt) + max(len(self.tokens) - 1, 0)


@dataclasses.dataclass(frozen=True)
class PoolSizes:
    """The static sizes of a slot pool: they fix its memory and every program an ``Engine`` compiles
    (``engine.PoolShape.of`` derives them from the engine's settings)."""

    slots: int
    max_len: int
    cache_len: int
    decode_steps: int
    prefill_chunk: int
    prefill_tokens: int
    max_stop_ids: int
    record: bool
    penalties: bool = False  # the pool keeps penalty knobs and generated-token counts
    max_logit_bias: int = 0  # logit-bias entries per request (with penalties)

    def prompt_bucket(self, n: int) -> int:
        """The prefill cache length of an ``n``-token prompt."""
        return min(bucket(n, MIN_PROMPT_BUCKET), self.cache_len)

    def rows(self, distinct: int) -> int:
        """Prefill rows for ``distinct`` prompts."""
        return row_bucket(distinct, bucket(self.slots))

    def chunk(self, prompt_bucket: int, rest: int | None = None) -> int:
        """Tokens per prefill call and row for prompts of ``prompt_bucket`` of which at most ``rest`` tokens
        are left to prefill (the others loaded from the prefix cache)."""
        full = min(prompt_bucket, self.prefill_chunk)
        return full if rest is None else min(full, bucket(rest, MIN_PROMPT_BUCKET))

    def admits(self, distinct: int, prompt_bucket: int) -> bool:
        """Whether a group may grow to ``distinct`` prompts: rows x chunk within ``prefill_tokens`` (one
        prompt always fits)."""
        return distinct == 1 or self.rows(distinct) * self.chunk(prompt_bucket) <= self.prefill_tokens

    def prefill_programs(self) -> list[tuple[int, int]]:
        """Every (rows G, prompt bucket S) the engine may prefill with at full chunks (each a prefill and an
        insert program; a prompt that starts from the prefix cache may use a smaller chunk)."""
        out, S = [], MIN_PROMPT_BUCKET
        while True:
            S = min(S, self.cache_len)
            rows = {self.rows(n) for n in range(1, self.slots + 1) if self.admits(n, S)}
            out += [(G, S) for G in sorted(rows)]
            if S == self.cache_len:
                return out
            S *= 2

    def span(self, held: int) -> int:
        """Cache slots a decode call attends over when no row holds more than ``held`` tokens after it."""
        return min(bucket(held, MIN_PROMPT_BUCKET), self.cache_len)


class _Node:
    __slots__ = ("parent", "key", "block", "children", "pins")

    def __init__(self, parent: _Node | None, key: tuple[int, ...], block: int):
        self.parent, self.key, self.block = parent, key, block
        self.children: dict[tuple[int, ...], _Node] = {}
        self.pins = 0


class PrefixCache:
    """A trie of ``PREFIX_BLOCK``-token blocks over ``blocks`` device blocks, least recently used evicted.

    ``lookup(prompt)`` -> the cached nodes of its leading whole blocks (at most ``len - 1`` tokens);
    ``reserve(prompt, path)`` -> (block index, device block) for its further whole blocks, new nodes whose
    device blocks the caller fills. Both pin what they return until ``unpin``.
    """

    def __init__(self, blocks: int):
        self.blocks = blocks
        self._root = _Node(None, (), -1)
        self._free = list(range(blocks))[::-1]
        self._lru: collections.OrderedDict[int, _Node] = collections.OrderedDict()  # block -> node, oldest first

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, prompt: Sequence[int]) -> list[_Node]:
        node, path = self._root, []
        for j in range((len(prompt) - 1) // PREFIX_BLOCK):
            node = node.children.get(tuple(prompt[j * PREFIX_BLOCK:(j + 1) * PREFIX_BLOCK]))
            if node is None:
                break
            path.append(node)
        self._use(path)
        return path

    def reserve(self, prompt: Sequence[int], path: list[_Node]) -> tuple[list[_Node], list[tuple[int, int]]]:
        """New nodes for ``prompt``'s whole blocks after ``path`` (those already cached are skipped, and
        the rest stops where no device block can be freed). Returns (nodes, [(block index, device block)])
        of the blocks the caller must save."""
        node = path[-1] if path else self._root
        nodes, save = [], []
        for j in range(len(path), len(prompt) // PREFIX_BLOCK):
            key = tuple(prompt[j * PREFIX_BLOCK:(j + 1) * PREFIX_BLOCK])
            child = node.children.get(key)
            if child is None:
                node.pins += 1  # the parent must outlive the eviction that makes room for its child
                block = self._allocate()
                node.pins -= 1
                if block is None:
                    break
                child = node.children[key] = _Node(node, key, block)
                self._lru[block] = child
                save.append((j, block))
            nodes.append(child)
            node = child
        self._use(nodes)
        return nodes, save

    def unpin(self, nodes: list[_Node]) -> None:
        for n in nodes:
            n.pins -= 1

    def _use(self, nodes: list[_Node]) -> None:
        """Pins ``nodes`` and marks them used, the deepest oldest (an ancestor outlives its descendants)."""
        for n in reversed(nodes):
            n.pins += 1
            self._lru.move_to_end(n.block)

    def _allocate(self) -> int | None:
        if self._free:
            return self._free.pop()
        for block, node in self._lru.items():
            if not node.children and node.pins == 0:
                del self._lru[block]
                del node.parent.children[node.key]
                return block
        return None


@dataclasses.dataclass
class Prefill:
    """One prefill row: a distinct prompt, the device blocks its leading ``len(cached) * PREFIX_BLOCK``
    tokens load from, and the (block index, device block) pairs its prefill saves. ``score``: a request
    asks the prompt's log-probs, so the row runs the whole prompt (cached blocks have no logits)."""

    prompt: tuple[int, ...]
    cached: list[int]
    save: list[tuple[int, int]]
    score: bool = False

    @property
    def start(self) -> int:
        """Tokens loaded from the prefix cache: the prefill runs ``prompt[start:]``."""
        return len(self.cached) * PREFIX_BLOCK


@dataclasses.dataclass
class Group:
    """One admission: a prefill of ``rows`` rows x ``bucket`` cache slots in chunks of ``chunk`` tokens,
    then ``requests[i]`` (slot assigned) starts from prefill row ``row_of[i]``."""

    bucket: int
    rows: int
    chunk: int
    prefills: list[Prefill]
    requests: list[Request]
    row_of: list[int]
    _pinned: list[_Node] = dataclasses.field(default_factory=list, repr=False)

    @property
    def score(self) -> bool:
        """Whether the prefill computes prompt log-probs (some row asks them)."""
        return any(p.score for p in self.prefills)


@dataclasses.dataclass
class DecodeBatch:
    """One decode call: slots ``[0, active)`` over cache slots ``[0, span)``; ``cancel``: slots to stop first."""

    active: int
    span: int
    cancel: list[int]


@dataclasses.dataclass
class Plan:
    groups: list[Group]
    decode: DecodeBatch | None


class Scheduler:
    """Waiting queues by prompt bucket, the free-slot heap, the running requests and the prefix cache.

    ``prefix_blocks``: device blocks of the prefix cache (0: none).
    """

    def __init__(self, pool: PoolSizes, prefix_blocks: int = 0):
        self.pool = pool
        self.prefix = PrefixCache(prefix_blocks) if prefix_blocks else None
        self.free = list(range(pool.slots))  # a heap: requests take the lowest free slots
        self.running: dict[int, Request] = {}
        self.waiting: dict[int, collections.deque] = {}  # prompt bucket -> FIFO
        self._cancel: list[Request] = []  # running requests to stop at the next decode

    def add(self, request: Request) -> None:
        self.waiting.setdefault(self.pool.prompt_bucket(len(request.prompt)), collections.deque()).append(request)

    def cancel(self, request: Request) -> bool:
        """Cancels ``request``: True when it was waiting (removed: the caller finishes it), else a running
        one stops at the next decode."""
        for S, queue in self.waiting.items():
            if request in queue:
                queue.remove(request)
                if not queue:
                    del self.waiting[S]
                return True
        if request.slot is not None and self.running.get(request.slot) is request:  # not another engine's
            self._cancel.append(request)
        return False

    @property
    def waiting_count(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def schedule(self) -> Plan:
        """Admission groups while slots are free and requests wait, then the decode batch of every running
        request (those just admitted included)."""
        groups = []
        while self.free and self.waiting:
            group = self._take_group()
            groups.append(group)
            for r in group.requests:
                r.slot = heapq.heappop(self.free)
                self.running[r.slot] = r
        return Plan(groups=groups, decode=self._decode_batch() if self.running else None)

    def prefilled(self, group: Group) -> None:
        """``group``'s prefill has run (its saved blocks are filled): its prefix-cache nodes are unpinned."""
        if self.prefix is not None:
            self.prefix.unpin(group._pinned)
            group._pinned.clear()

    def finish(self, request: Request) -> None:
        """``request`` left its slot."""
        del self.running[request.slot]
        heapq.heappush(self.free, request.slot)

    def _take_group(self) -> Group:
        """The oldest waiting request and others of its bucket, as many as free slots and
        ``prefill_tokens`` allow (a repeated prompt costs a slot, not a prefill row)."""
        S = min(self.waiting, key=lambda b: self.waiting[b][0].id)
        queue = self.waiting[S]
        requests, rows = [], {}
        while queue and len(requests) < len(self.free):
            fresh = queue[0].prompt not in rows
            if fresh and not self.pool.admits(len(rows) + 1, S):
                break
            rows.setdefault(queue[0].prompt, len(rows))
            requests.append(queue.popleft())
        if not queue:
            del self.waiting[S]
        scored = {r.prompt for r in requests if r.sampling.prompt_logprobs is not None}
        prefills, pinned = [Prefill(prompt=prompt, cached=[], save=[], score=prompt in scored) for prompt in rows], []
        if self.prefix is not None:
            # Every lookup before any reservation: a block this group saves is not there for its own prefill.
            paths = [[] if p.score else self.prefix.lookup(p.prompt) for p in prefills]
            for p, path in zip(prefills, paths):
                nodes, p.save = self.prefix.reserve(p.prompt, path)
                p.cached, pinned = [n.block for n in path], pinned + path + nodes
        rest = max(len(p.prompt) - p.start for p in prefills)
        return Group(bucket=S, rows=self.pool.rows(len(rows)), chunk=self.pool.chunk(S, rest), prefills=prefills,
                     requests=requests, row_of=[rows[r.prompt] for r in requests], _pinned=pinned)

    def _decode_batch(self) -> DecodeBatch:
        # By request, not slot: one cancelled here may have finished since, and its slot gone to another.
        cancel = [slot for slot, r in self.running.items() if any(r is c for c in self._cancel)]
        self._cancel.clear()
        held = max(r.held for r in self.running.values()) + self.pool.decode_steps
        return DecodeBatch(active=min(bucket(max(self.running) + 1), self.pool.slots), span=self.pool.span(held),
                           cancel=cancel)
