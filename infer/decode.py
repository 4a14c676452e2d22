"""The engine's device programs: chunked prefill, insert into slots, and k decode steps.

Pure functions over pytrees with no host logic; ``zaya_jax.infer.engine.Engine`` schedules them. A
slot pool is ``SlotState``: ``slots`` rows of ``max_len`` cache slots, each row its own request at its
own length and position (see ``zaya_jax.cache``), so memory is fixed by (slots, max_len) alone.

Flow of a request: ``prefill_chunk`` runs its prompt (with others of the same length bucket) into a
small cache of its own, chunk by chunk; ``insert`` copies that cache into a free slot (into several
slots for requests sharing a prompt), samples the first token and sets the slot's knobs; ``decode``
then feeds each running slot's last token, samples the next and emits it, ``steps`` times per call.
A request's step-s draw uses ``fold_in(key, s)`` with its own key: no dependence on the slot, the
batch company or the slot count.

With ``record`` (RL rollouts), the pool also keeps each slot's routing and the log-probability of each
sampled token, by position: prefill writes the prompt's routes, decode the fed tokens' routes and the
new tokens' log-probs, insert copies them into the slot. Without it those fields are None and the
programs are the plain ones.

Log-probs for clients (``zaya_jax.infer.logprobs``): insert and decode return, with the tokens, each
emitted token's log-prob under the model and the K most likely tokens, computed only when the host says
some row asks (a dynamic flag: one program either way). Prefill computes the prompt's per-position
log-probs when given the prompt's next tokens (``targets``: a program of its own, for groups that ask).

Shapes: M slots, T cache slots per slot (= max_len), G prefill rows, C chunk tokens, V vocabulary,
K stop ids per request, L layers.
"""

from __future__ import annotations

import collections
import functools

import flax.struct
import jax
import jax.numpy as jnp

from zaya_jax import backend
from zaya_jax.cache import KVCache, from_bits, to_bits
from zaya_jax.config import ZayaConfig
from zaya_jax.model import INFERENCE_COMPILER_OPTIONS, apply, cached_context, head_kernel

from . import logprobs as lps
from .sampling import SamplingParams, sample, step_keys, token_logprobs
from .scheduler import StopReason

Array = jax.Array
RUNNING, STOP_TOKEN, MAX_NEW_TOKENS, CACHE_FULL, NON_FINITE, CANCELLED, IDLE = StopReason  # SlotState.reason


# Traces of each inference program by name: a trace precedes every compile, so tests bound recompiles with it.
TRACES: collections.Counter = collections.Counter()


def inference_jit(fn, *, static_argnames=(), donate_argnames=()):
    """``jax.jit`` with the inference compiler options; every inference program is compiled through here.

    INFERENCE_COMPILER_OPTIONS keep XLA:CPU from hoisting float32 copies of bf16 weights out of the
    layer scan and the decode loop (a float32 copy of the whole model otherwise; see zaya_jax.model).
    """
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        TRACES[fn.__name__] += 1
        return fn(*args, **kwargs)

    return jax.jit(traced, static_argnames=static_argnames, donate_argnames=donate_argnames,
                   compiler_options=INFERENCE_COMPILER_OPTIONS)


@flax.struct.dataclass
class SlotState:
    """The slot pool: what the decode loop carries.

    cache:    KVCache [layers, M, T, ...], lengths [M]: tokens fed per slot
    token:    [M] int32     last emitted token of each slot (fed at the next step)
    num_new:  [M] int32     tokens emitted by the slot's request so far (its step counter)
    reason:   [M] int32     RUNNING, why the request stopped, or IDLE
    keys:     [M] keys      per-request base keys; step s draws with fold_in(keys[m], s)
    sampling: SamplingParams of [M] arrays
    max_new:  [M] int32     per-request limit on emitted tokens
    limit:    [M] int32     per-request limit on prompt + emitted tokens (<= T)
    stop_ids: [M, K] int32  per-request stop tokens, padded with -1
    routes:   [M, T, L] int32 or None   (record) the route each fed token took in each layer; -1 elsewhere
    logprobs: [M, T] float32 or None    (record) log-prob of each sampled token at its position, under
              the temperature-scaled model distribution (the sampling filters aside)
    """

    cache: KVCache
    token: Array
    num_new: Array
    reason: Array
    keys: Array
    sampling: SamplingParams
    max_new: Array
    limit: Array
    stop_ids: Array
    routes: Array | None = None
    logprobs: Array | None = None


def init_slots(cache: KVCache, stop_width: int, record: bool = False) -> SlotState:
    """An idle pool over an empty ``cache`` (``zaya_jax.init_cache(config, slots, max_len, dtype)``);
    ``record``: with the routes and log-probs buffers."""
    L, M, T = cache.k.shape[:3]
    zeros = lambda: jnp.zeros((M,), jnp.int32)  # noqa: E731  (distinct buffers: the state is donated)
    return SlotState(cache=cache, token=zeros(), num_new=zeros(), reason=jnp.full((M,), IDLE, jnp.int32),
                     keys=jax.random.split(jax.random.key(0), M), sampling=SamplingParams.create(M),
                     max_new=zeros(), limit=zeros(), stop_ids=jnp.full((M, stop_width), -1, jnp.int32),
                     routes=jnp.full((M, T, L), -1, jnp.int32) if record else None,
                     logprobs=jnp.zeros((M, T), jnp.float32) if record else None)


def prefill_chunk(params, config: ZayaConfig, cache: KVCache, tokens: Array, new_len: Array, last: Array, *,
                  moe_impl: str = "auto", record: bool = False, state_every: int = 0, targets: Array | None = None):
    """Appends one chunk of right-padded prompts to ``cache`` (a small [layers, G, S] prefill cache).

    tokens: [G, C] int32, row g's next ``new_len[g]`` tokens first; last: [G, V] float32 logits after
    each row's tokens so far. Returns (last logits [G, V] — updated for rows with new tokens —, cache),
    then with ``record`` the chunk's routes [G, C, L] int32, then with ``targets`` ([G, C] int32: the
    token after each chunk token) their ``logprobs.Logprobs`` [G, C] at each chunk position, then with
    ``state_every`` the CCA states after every ``state_every`` tokens of the chunk (``CCAProjection``:
    conv [L, G, C // e, Kc, C'] and v_prev [L, G, C // e, kv_dim / 2], in the cache's storage). Without
    ``targets`` the LM head runs on each row's last new token only.
    """
    ctx = cached_context(cache, tokens.shape[1], new_len, state_every=state_every)
    hidden, cache, aux = apply(params, config, tokens, ctx, cache, moe_impl=moe_impl, return_hidden=True)
    end = jnp.maximum(new_len - 1, 0)[:, None, None]
    h = jnp.take_along_axis(hidden, end, axis=1)[:, 0]  # [G, D]
    kernel = head_kernel(params, config)
    with jax.named_scope("lm_head"):
        logits = jnp.einsum("gd,dv->gv", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
    last = jnp.where(new_len[:, None] > 0, logits, last)
    out = (last, cache)
    if record:
        out += (aux["routes"].transpose(1, 2, 0),)
    if targets is not None:
        with jax.named_scope("prompt_logprobs"):
            out += (lps.of_hidden(hidden, kernel, targets, lps.width(config.vocab_size)),)
    if state_every:
        out += (aux["states"],)
    return out


def load_prefix(cache: KVCache, store: KVCache, table: Array, count: Array) -> KVCache:
    """Starts prefill rows from the prefix cache: row g of ``cache`` (a fresh [layers, G, S] prefill cache)
    gets the keys and values of store blocks ``table[g, :count[g]]`` in its first ``count[g] x P`` slots,
    and the CCA state at the end of the last of them.

    store: [layers, N, P] blocks of P tokens, each with the state at its end (``conv``, ``v_prev``);
    table: [G, S // P] int32 block ids (any id past ``count``); count: [G] int32.
    """
    L, G, S = cache.k.shape[:3]
    P = store.k.shape[2]
    held = jnp.arange(S)[None, :] < (count * P)[:, None]  # [G, S]
    tokens = lambda a, b: jnp.where(held[None, :, :, None, None], a[:, table].reshape(b.shape), b)  # noqa: E731
    end = table[jnp.arange(G), jnp.maximum(count - 1, 0)]
    state = lambda a, b: jnp.where((count > 0).reshape((1, G) + (1,) * (b.ndim - 2)), a[:, end], b)  # noqa: E731
    return cache.replace(k=tokens(store.k, cache.k), v=tokens(store.v, cache.v), conv=state(store.conv, cache.conv),
                         v_prev=state(store.v_prev, cache.v_prev), lengths=count * P)


def save_prefix(store: KVCache, cache: KVCache, states, row: Array, block: Array, since: Array, dst: Array) -> KVCache:
    """Writes prefix-cache blocks: store block ``dst[i]`` gets block ``block[i]`` (slots ``block[i] x P`` ..
    ``+ P``) of prefill row ``row[i]`` of ``cache``, and the CCA state after it, ``states`` entry
    ``block[i] - since[i]`` (the row's prefill started at block ``since[i]``); entries with ``dst[i] >= N``
    are padding.

    states: (conv [L, G, E, Kc, C], v_prev [L, G, E, kv_dim / 2]): ``prefill_chunk``'s, chunks joined.
    """
    P = store.k.shape[2]
    slots = block[:, None] * P + jnp.arange(P)[None, :]  # [I, P]
    put = lambda a, v: a.at[:, dst].set(v, mode="drop")  # noqa: E731
    conv, v_prev = states
    return store.replace(k=put(store.k, cache.k[:, row[:, None], slots]), v=put(store.v, cache.v[:, row[:, None], slots]),
                         conv=put(store.conv, conv[:, row, block - since]),
                         v_prev=put(store.v_prev, v_prev[:, row, block - since]))


def insert(state: SlotState, cache: KVCache, logits: Array, src: Array, dst: Array, count: Array, keys: Array,
           sampling: SamplingParams, max_new: Array, limit: Array, stop_ids: Array, routes: Array | None = None,
           want_logprobs: Array | bool = False):
    """Starts requests in slots: copies prefill row ``src[i]`` of ``cache`` into slot ``dst[i]``, samples
    its first token from ``logits[src[i]]`` and stores its knobs, for ``i < count``; entries from
    ``count`` on are padding and must have ``dst[i] >= M``.

    cache: [layers, G, S] with S <= T; logits: [G, V]; src, dst, max_new, limit: [I]; count: [] int32;
    keys: [I] keys; sampling: [I] arrays; stop_ids: [I, K]; routes: [G, S, L] the prompts' routes (a
    recording pool only); want_logprobs: [] bool, whether to compute the first tokens' log-probs. The
    engine pads I to M, so one program serves every group size of a (G, S) prefill. Returns (state, first
    tokens [I], reasons [I], their ``logprobs.Logprobs`` [I] — zeros unless wanted).
    """
    S = cache.k.shape[2]
    put = lambda a, v: a.at[dst].set(v, mode="drop")  # noqa: E731
    new_cache = _copy_rows(state.cache, cache, src, dst, count)
    new_cache = new_cache.replace(lengths=put(new_cache.lengths, cache.lengths[src]))
    num_new = jnp.zeros_like(max_new)
    token, reason = _choose(logits[src], sampling, keys, num_new, cache.lengths[src], max_new, stop_ids, limit)
    first = lps.of_logits_if(jnp.asarray(want_logprobs), logits[src], token, lps.width(logits.shape[-1]))
    state = state.replace(
        cache=new_cache, token=put(state.token, token), num_new=put(state.num_new, num_new + (reason != NON_FINITE)),
        reason=put(state.reason, reason), keys=put(state.keys, keys),
        sampling=jax.tree.map(put, state.sampling, sampling), max_new=put(state.max_new, max_new),
        limit=put(state.limit, limit), stop_ids=put(state.stop_ids, stop_ids))
    if state.routes is not None:
        T = state.logprobs.shape[1]
        held = cache.lengths[src]
        lp = token_logprobs(logits[src], sampling.temperature, token)
        logprobs = jnp.zeros((dst.shape[0], T), jnp.float32).at[jnp.arange(dst.shape[0]), held].set(lp, mode="drop")
        prompt_routes = jnp.where(jnp.arange(S)[None, :, None] < held[:, None, None], routes[src], -1)  # no padding
        routes = state.routes.at[dst].set(-1, mode="drop").at[dst, :S].set(prompt_routes, mode="drop")
        state = state.replace(routes=routes, logprobs=put(state.logprobs, logprobs))
    return state, token, reason, first


def _copy_rows(pool: KVCache, cache: KVCache, src: Array, dst: Array, count: Array) -> KVCache:
    """``pool`` with prefill row ``src[i]`` of ``cache`` copied into slot ``dst[i]``, for ``i < count``.

    On XLA:CPU, one slot per loop iteration, in place: no ``[layers, slots, S]`` gather of the prefill cache.
    Elsewhere, one masked merge of the pool's first S positions: a dynamic row index into a pool whose rows
    are split over chips made the TPU compiler gather the whole pool (ZAYA1-8B, 64 x 8192 on v5e-8: 10 GiB
    of temporaries per chip, `zaya plan`), where a select over each chip's own rows stays local."""
    S = cache.k.shape[2]
    if backend.platform() == "cpu":
        def copy_row(i, c):
            put_row = lambda a, b, *ix: a.at[(slice(None), dst[i]) + ix].set(  # noqa: E731
                to_bits(from_bits(b[:, src[i]], cache.dtype), c.dtype), mode="drop")
            return c.replace(k=put_row(c.k, cache.k, slice(0, S)), v=put_row(c.v, cache.v, slice(0, S)),
                             conv=put_row(c.conv, cache.conv), v_prev=put_row(c.v_prev, cache.v_prev))

        return jax.lax.fori_loop(0, count, copy_row, pool)
    M = pool.lengths.shape[0]
    # The prefill row each slot takes, -1 for slots left as they are.
    row = jnp.full((M,), -1, jnp.int32).at[dst].set(jnp.where(jnp.arange(dst.shape[0]) < count, src, -1), mode="drop")

    def merge(a, b):  # a: [layers, M, ...] of the pool (its first S positions for k, v); b: [layers, G, ...]
        taken = to_bits(from_bits(b[:, jnp.maximum(row, 0)], cache.dtype), pool.dtype)
        return jnp.where((row >= 0).reshape((1, M) + (1,) * (a.ndim - 2)), taken, a)

    first = lambda a, b: a.at[:, :, :S].set(merge(a[:, :, :S], b))  # noqa: E731
    return pool.replace(k=first(pool.k, cache.k), v=first(pool.v, cache.v), conv=merge(pool.conv, cache.conv),
                        v_prev=merge(pool.v_prev, cache.v_prev))


def _choose(logits, sampling, keys, num_new, held, max_new, stop_ids, limit):
    """Samples step ``num_new`` of each row and decides which rows stop.

    held: [R] tokens in the cache before the chosen token is fed. A row stops on a stop token, on
    reaching ``max_new`` tokens, or once prompt + output reach ``limit`` (no room to feed the token
    back: "cache_full"); non-finite logits stop it without a token ("non_finite").
    """
    token = sample(logits, sampling, step_keys(keys, num_new))
    finite = jnp.all(jnp.isfinite(logits), axis=-1)
    hit_stop = jnp.any(token[:, None] == stop_ids, axis=-1)
    reason = jnp.select([~finite, hit_stop, num_new + 1 >= max_new, held + 1 >= limit],
                        [NON_FINITE, STOP_TOKEN, MAX_NEW_TOKENS, CACHE_FULL], RUNNING)
    return token, reason.astype(jnp.int32)


def decode(params, config: ZayaConfig, state: SlotState, cancel: Array, want_logprobs: Array | bool = False, *,
           steps: int, active: int | None = None, span: int | None = None, moe_impl: str = "auto"):
    """Up to ``steps`` decode steps of every running slot in one ``lax.while_loop`` (fewer once none runs).

    cancel: [M] bool, running slots to stop first (reason CANCELLED). active: decode slots ``[0, active)``
    only (the engine keeps its requests in the lowest slots, so a lone request costs one row, not M);
    the rest are left as they are. span: attend over cache slots ``[0, span)`` only, so a step costs what
    the rows hold, not T; every running row must hold at most ``span - steps`` tokens (its reads and
    writes then stay inside). want_logprobs: [] bool, whether to compute the emitted tokens' log-probs.
    Returns (state, emitted [M, steps] int32 — the token a slot emitted at each step, -1 where it emitted
    none —, their ``logprobs.Logprobs`` [M, steps], zeros unless wanted).
    """
    M = state.token.shape[0]
    K = lps.width(config.vocab_size)
    want_logprobs = jnp.asarray(want_logprobs)
    state = state.replace(reason=jnp.where(cancel & (state.reason == RUNNING), CANCELLED, state.reason))
    if active is not None and active < M:
        window, out, lp = decode(params, config, _rows(state, active, span), cancel[:active], want_logprobs,
                                 steps=steps, moe_impl=moe_impl)
        lp = jax.tree.map(lambda full, w: full.at[:active].set(w), lps.empty((M, steps), K), lp)
        return _put_rows(state, window), jnp.full((M, steps), -1, jnp.int32).at[:active].set(out), lp
    out = (jnp.full((M, steps), -1, jnp.int32), lps.empty((M, steps), K))

    def cond(carry):
        i, s, _ = carry
        return (i < steps) & jnp.any(s.reason == RUNNING)

    def body(carry):
        i, s, (out, lp) = carry
        running = s.reason == RUNNING
        ctx = cached_context(s.cache, 1, running.astype(jnp.int32), keys=span)
        logits, cache, aux = apply(params, config, s.token[:, None], ctx, s.cache, moe_impl=moe_impl)
        token, reason = _choose(logits[:, 0], s.sampling, s.keys, s.num_new, cache.lengths, s.max_new, s.stop_ids,
                                s.limit)
        emitted = running & (reason != NON_FINITE)
        out = out.at[:, i].set(jnp.where(emitted, token, -1))
        lp = jax.tree.map(lambda a, v: a.at[:, i].set(v), lp, lps.of_logits_if(want_logprobs, logits[:, 0], token, K))
        if s.routes is not None:  # the fed token's routes at its position; the new token's log-prob at its own
            rows, T = jnp.arange(M), s.logprobs.shape[1]
            fed = jnp.where(running, s.cache.lengths, T)
            new = jnp.where(emitted, cache.lengths, T)
            lp = token_logprobs(logits[:, 0], s.sampling.temperature, token)
            s = s.replace(routes=s.routes.at[rows, fed].set(aux["routes"][:, :, 0].T, mode="drop"),
                          logprobs=s.logprobs.at[rows, new].set(lp, mode="drop"))
        s = s.replace(cache=cache, token=jnp.where(emitted, token, s.token), num_new=s.num_new + emitted,
                      reason=jnp.where(running, reason, s.reason))
        return i + 1, s, (out, lp)

    _, state, (out, lp) = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, out))
    return state, out, lp


# The per-slot fields of SlotState, row axis 0 (routes and logprobs are None in a pool that does not record).
PER_SLOT = ("token", "num_new", "reason", "keys", "sampling", "max_new", "limit", "stop_ids", "routes", "logprobs")


def _rows(state: SlotState, n: int, span: int | None = None) -> SlotState:
    """Slots ``[0, n)`` of the pool, their cache cut to its first ``span`` slots (default all; cache rows
    are axis 1 of the layer-stacked arrays)."""
    c = state.cache
    cache = c.replace(k=c.k[:, :n, :span], v=c.v[:, :n, :span], conv=c.conv[:, :n], v_prev=c.v_prev[:, :n],
                      lengths=c.lengths[:n])
    return state.replace(cache=cache, **{f: jax.tree.map(lambda a: a[:n], getattr(state, f)) for f in PER_SLOT})


def _put_rows(state: SlotState, window: SlotState) -> SlotState:
    """``state`` with slots ``[0, n)`` (their first ``span`` cache slots) replaced by ``window`` (updated in
    place: the pool is donated)."""
    c, w = state.cache, window.cache
    n, span = w.lengths.shape[0], w.max_len
    cache = c.replace(k=c.k.at[:, :n, :span].set(w.k), v=c.v.at[:, :n, :span].set(w.v), conv=c.conv.at[:, :n].set(w.conv),
                      v_prev=c.v_prev.at[:, :n].set(w.v_prev), lengths=c.lengths.at[:n].set(w.lengths))
    put = lambda a, b: a.at[:n].set(b)  # noqa: E731
    return state.replace(cache=cache, **{f: jax.tree.map(put, getattr(state, f), getattr(window, f)) for f in PER_SLOT})


prefill_chunk_compiled = inference_jit(prefill_chunk, static_argnames=("config", "moe_impl", "record", "state_every"),
                                       donate_argnames=("cache", "last"))
load_prefix_compiled = inference_jit(load_prefix, donate_argnames=("cache",))
save_prefix_compiled = inference_jit(save_prefix, donate_argnames=("store",))
insert_compiled = inference_jit(insert, donate_argnames=("state",))
decode_compiled = inference_jit(decode, static_argnames=("config", "steps", "active", "span", "moe_impl"),
                                donate_argnames=("state",))
