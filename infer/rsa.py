"""Markov RSA: Zyphra's Markovian Recursive Self-Aggregation as a compiled population search.

Round 0 samples ``population`` rollouts of the question (the question is prefilled once per problem
and its cache broadcast to the members). Each of ``rounds`` aggregation rounds gives every member a
prompt of the question plus ``tails`` tails drawn without replacement from the previous round only
(``tails=1``: each member continues from its own tail), and samples again. A tail is the last
``tail_tokens`` generated tokens of a candidate, stop token excluded, finished or not.

Everything per member is array code: tail extraction, subset draws and prompt assembly run in one
jitted, vmapped function, the population is folded into the batch axis of the model, and all
aggregation rounds share one compiled program (the same static shapes). Only answer extraction and
the result bookkeeping run on the host.

Shapes: P problems, N population, C tails per prompt, tau tail tokens, R = P * N rows.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from collections import Counter
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zaya_jax.config import ZayaConfig
from zaya_jax.model import compute_dtype

from . import engine
from .generation import MIN_OUTPUT_BUCKET, MIN_PROMPT_BUCKET, MIN_STOP_BUCKET, bucket, decode_compiled, prefill_and_start
from .sampling import SamplingParams, pad_rows, row_keys

_ROUND_SALT, _SUBSET_SALT = 0x52534147, 0x53554253  # "RSAG", "SUBS": key streams disjoint from row keys


# ---------------------------------------------------------------------------------------------- template
@dataclasses.dataclass(frozen=True)
class AggregationTemplate:
    """The aggregation prompt as text pieces, wrapped in the model's chat template as one user turn:

    ``intro + question + before_candidates + (header(i) + tail + separator) * C + closing``
    """

    intro: str
    before_candidates: str
    header: str  # formatted with i = 1..C
    separator: str
    closing: str

    @classmethod
    def default(cls, tails: int) -> "AggregationTemplate":
        """The RSA math template (Venkatraman et al.) adapted to tails; the ``tails=1`` refinement variant."""
        if tails == 1:
            return cls(
                intro="You are given a math problem and the final part of a candidate solution. Refine this "
                      "trajectory into an improved solution. If it is entirely wrong, attempt a new strategy. "
                      "End with the final answer in \\boxed{}.\n\nProblem:\n",
                before_candidates="\n\nCandidate solution (final part only; it may contain mistakes):\n",
                header="---- Candidate ----\n",
                separator="\n",
                closing="Now refine the candidate into an improved solution. Provide clear reasoning and end with "
                        "the final answer in \\boxed{}.",
            )
        return cls(
            intro="You are given a math problem and several candidate solutions. Some candidates may be incorrect "
                  "or contain errors. Aggregate the useful ideas and produce a single, high-quality solution. "
                  "Reason carefully; if candidates disagree, choose the correct path. If all are incorrect, then "
                  "attempt a different strategy. End with the final answer in \\boxed{}.\n\nProblem:\n",
            before_candidates="\n\nCandidate solutions (final parts only; they may contain mistakes):\n",
            header="---- Solution {i} ----\n",
            separator="\n",
            closing="Now write a single improved solution. Provide clear reasoning and end with the final answer "
                    "in \\boxed{}.",
        )

    def render(self, question: str, tails: Sequence[str]) -> str:
        """The user-turn text for ``question`` and candidate ``tails`` (what the token assembly encodes)."""
        body = "".join(self.header.format(i=i + 1) + t + self.separator for i, t in enumerate(tails))
        return self.intro + question + self.before_candidates + body + self.closing


@dataclasses.dataclass(frozen=True)
class TokenTemplate:
    """Pre-tokenized pieces of the round-0 and aggregation prompts (token space, no text needed).

    round0_prefix + question + round0_suffix                      (round 0)
    agg_prefix + question + agg_middle + (headers[c] + tail + separator)*C + agg_suffix   (rounds >= 1)
    """

    round0_prefix: tuple[int, ...]
    round0_suffix: tuple[int, ...]
    agg_prefix: tuple[int, ...]
    agg_middle: tuple[int, ...]
    headers: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]
    agg_suffix: tuple[int, ...]

    @classmethod
    def from_text(cls, template: AggregationTemplate, tails: int, encode: Callable[[str], list[int]],
                  chat: Callable[[str], str] | None = None) -> "TokenTemplate":
        """Tokenizes ``template``; ``chat(content)`` renders one user turn plus the generation prompt.

        The chat rendering is split around the content, so question and tails are inserted as tokens.
        """
        marker = "\x00ZAYA_RSA_CONTENT\x00"
        before, after = (chat(marker) if chat else marker).split(marker)
        return cls(
            round0_prefix=tuple(encode(before)),
            round0_suffix=tuple(encode(after)),
            agg_prefix=tuple(encode(before + template.intro)),
            agg_middle=tuple(encode(template.before_candidates)),
            headers=tuple(tuple(encode(template.header.format(i=i + 1))) for i in range(tails)),
            separator=tuple(encode(template.separator)),
            agg_suffix=tuple(encode(template.closing + after)),
        )


    @classmethod
    def from_tokenizer(cls, template: AggregationTemplate, tails: int, tokenizer) -> "TokenTemplate":
        """Tokenizes ``template`` with a ``zaya_jax.infer.tokenizer.Tokenizer``, inside its chat template."""
        return cls.from_text(template, tails, functools.partial(tokenizer.encode, add_special_tokens=False),
                             lambda content: tokenizer.render_chat([{"role": "user", "content": content}],
                                                                   add_generation_prompt=True))


# ---------------------------------------------------------------------------------------------- array code
def extract_tails(tokens, gen_len, tau: int):
    """The last ``tau`` tokens of each row, left-aligned.

    tokens: [R, Lgen] int32; gen_len: [R] tokens per row (stop token excluded).
    Returns tails [R, tau] (zeros past the tail) and tail_len [R] = min(gen_len, tau).
    """
    R, Lgen = tokens.shape
    tail_len = jnp.minimum(gen_len, tau)
    cols = (gen_len - tail_len)[:, None] + jnp.arange(tau)[None, :]
    tails = jnp.take_along_axis(tokens, jnp.clip(cols, 0, Lgen - 1), axis=1)
    return jnp.where(jnp.arange(tau)[None, :] < tail_len[:, None], tails, 0), tail_len


def draw_subsets(key, problems: int, population: int, tails: int):
    """[P, N, C] member indices: for each member, ``tails`` distinct members of its problem's population,
    uniformly without replacement; ``tails == 1`` gives each member its own index."""
    if tails == 1:
        return jnp.broadcast_to(jnp.arange(population)[None, :, None], (problems, population, 1))
    keys = jax.random.split(key, problems * population)
    draw = jax.vmap(lambda k: jax.random.choice(k, population, (tails,), replace=False))
    return draw(keys).reshape(problems, population, tails).astype(jnp.int32)


def assemble_prompts(pieces: dict, tails, tail_len, subsets, question, question_len):
    """Aggregation prompts, right-aligned (left-padded) in a fixed-width buffer.

    pieces: token arrays prefix/middle/separator/suffix [n] and headers [C, H] with header_len [C];
    tails: [P, N, tau]; tail_len: [P, N]; subsets: [P, N, C]; question: [P, Q] left-aligned with
    question_len [P]. Returns prompts [P, N, L] and lengths [P, N].
    """
    P, N, C = subsets.shape

    def one(q, q_len, member_tails, member_len):  # member_tails [C, tau]
        parts = [(pieces["prefix"], pieces["prefix"].shape[0]), (q, q_len), (pieces["middle"], pieces["middle"].shape[0])]
        for c in range(C):
            parts += [(pieces["headers"][c], pieces["header_len"][c]), (member_tails[c], member_len[c]),
                      (pieces["separator"], pieces["separator"].shape[0])]
        parts.append((pieces["suffix"], pieces["suffix"].shape[0]))
        tokens = jnp.concatenate([p for p, _ in parts])
        valid = jnp.concatenate([jnp.arange(p.shape[0]) < n for p, n in parts])
        # A stable sort on validity moves padding to the front and keeps the token order.
        order = jnp.argsort(valid, stable=True)
        return jnp.where(valid[order], tokens[order], 0), valid.sum()

    chosen = jnp.take_along_axis(tails[:, None], subsets[..., None], axis=2)  # [P, N, C, tau]
    chosen_len = jnp.take_along_axis(tail_len[:, None], subsets, axis=2)  # [P, N, C]
    per_member = jax.vmap(one, in_axes=(None, None, 0, 0))
    return jax.vmap(per_member)(question, question_len, chosen, chosen_len)


@functools.partial(jax.jit, static_argnames=("tau", "tails"))
def _aggregate(pieces, tokens, gen_len, question, question_len, key, *, tau: int, tails: int):
    """tokens [P, N, Lgen], gen_len [P, N] -> (prompts [P*N, L], lengths [P*N], subsets, tails, tail_len)."""
    P, N, Lgen = tokens.shape
    tail_tok, tail_len = extract_tails(tokens.reshape(P * N, Lgen), gen_len.reshape(-1), tau)
    tail_tok, tail_len = tail_tok.reshape(P, N, tau), tail_len.reshape(P, N)
    subsets = draw_subsets(key, P, N, tails)
    prompts, lengths = assemble_prompts(pieces, tail_tok, tail_len, subsets, question, question_len)
    return prompts.reshape(P * N, -1), lengths.reshape(-1), subsets, tail_tok, tail_len


@functools.partial(jax.jit, static_argnames=("config", "population", "cache_len", "buffer_len", "moe_impl"))
def _round0(params, config, tokens, starts, max_len, sampling, keys, max_new, stop_ids, *, population,
            cache_len, buffer_len, moe_impl):
    """Prefills each problem's prompt once ([P, S]) and broadcasts its cache to ``population`` rows."""
    from zaya_jax.cache import init_cache

    cache = init_cache(config, tokens.shape[0], cache_len, compute_dtype(params)).replace(starts=starts)
    logits, cache = engine.prefill(params, config, tokens, cache, moe_impl=moe_impl)
    rep = lambda a: jnp.repeat(a, population, axis=0)  # noqa: E731
    cache = cache.replace(k=jnp.repeat(cache.k, population, 1), v=jnp.repeat(cache.v, population, 1),
                          conv=jnp.repeat(cache.conv, population, 1), v_prev=jnp.repeat(cache.v_prev, population, 1),
                          starts=rep(cache.starts))
    return engine.start(rep(logits), cache, sampling, keys, max_new, stop_ids, max_len, buffer_len)


# ---------------------------------------------------------------------------------------------- answers
def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), or None."""
    if not isinstance(text, str):
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return re.sub(r"\s+", " ", text[i:j]).strip()
    return None


def majority(answers: Sequence[str | None]) -> tuple[str | None, float]:
    """The most common non-None answer (ties: the first seen) and its share of all members."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0.0
    best = max(counts, key=lambda a: (counts[a], -answers.index(a)))
    return best, counts[best] / len(answers)


# ---------------------------------------------------------------------------------------------- driver
@dataclasses.dataclass
class RSARound:
    """One generation stage; lists are [problem][member]."""

    candidates: list[list[list[int]]]
    stop_reasons: list[list[str]]
    tails: list[list[list[int]]]
    subsets: list[list[list[int]]] | None  # None for round 0
    prompts: list[list[list[int]]]
    generated_tokens: int
    seconds: float

    @property
    def longest_prompt(self) -> int:
        return max(len(m) for row in self.prompts for m in row)


@dataclasses.dataclass
class RSAResult:
    rounds: list[RSARound]
    answers: list[list[str | None]]  # final round, [problem][member]
    majority: list[tuple[str | None, float]]  # per problem: (answer, share of members)
    texts: list[list[str]] | None  # final round decoded, when a tokenizer was given

    @property
    def generated_tokens(self) -> int:
        return sum(r.generated_tokens for r in self.rounds)

    def problem(self, p: int) -> "RSAResult":
        """Problem ``p``'s part alone, as ``markov_rsa`` on that one question returns it."""
        def one(r: RSARound) -> RSARound:
            return dataclasses.replace(
                r, candidates=[r.candidates[p]], stop_reasons=[r.stop_reasons[p]], tails=[r.tails[p]],
                subsets=None if r.subsets is None else [r.subsets[p]], prompts=[r.prompts[p]],
                generated_tokens=sum(len(c) for c in r.candidates[p]))

        return RSAResult(rounds=[one(r) for r in self.rounds], answers=[self.answers[p]], majority=[self.majority[p]],
                         texts=None if self.texts is None else [self.texts[p]])


def _round_keys(seed: int, round_index: int, rows: int):
    """Round 0 uses generate's row keys (so ``rounds=0`` equals ``generate``); later rounds a salted stream."""
    if round_index == 0:
        return row_keys(seed, rows)
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _ROUND_SALT), round_index)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(rows))


def markov_rsa(params, config: ZayaConfig, prompt_ids, *, population: int, tails: int, rounds: int, budget: int,
               tail_tokens: int, final_budget: int | None = None, temperature: float = 1.0, top_p: float = 1.0,
               seed: int = 0, template: TokenTemplate | None = None, tokenizer=None,
               extract: Callable[[str], str | None] = extract_boxed, stop_token_ids=None,
               max_cache_len: int | None = None, moe_impl: str = "auto",
               progress: Callable[[int, RSARound], None] | None = None,
               on_problem: Callable[[int, "RSAResult"], None] | None = None) -> RSAResult:
    """Runs Markov RSA on one question (``prompt_ids``: the question's token ids) or several (a list of them).

    ``budget`` caps the tokens each candidate generates in rounds 0..T-1, ``final_budget`` (default
    ``budget``) in round T. ``template`` is a TokenTemplate; by default it is built from
    ``AggregationTemplate.default(tails)`` and ``tokenizer`` (a ``zaya_jax.infer.tokenizer.Tokenizer``),
    whose ``decode`` then feeds ``extract``.
    ``progress(round_index, round)`` is called after each round; ``on_problem(p, result)`` once problem
    ``p`` is finished, with its part alone (``RSAResult.problem(p)``).
    """
    questions = [list(map(int, prompt_ids))] if prompt_ids and np.isscalar(prompt_ids[0]) else [list(map(int, q)) for q in prompt_ids]
    final_budget = budget if final_budget is None else final_budget
    _validate(config, questions, population, tails, rounds, budget, final_budget, tail_tokens)
    if template is None:
        if tokenizer is None:
            raise ValueError("markov_rsa needs a `template` (TokenTemplate) or a `tokenizer` to build the default one")
        template = TokenTemplate.from_tokenizer(AggregationTemplate.default(tails), tails, tokenizer)
    if len(template.headers) != tails:
        raise ValueError(f"template has {len(template.headers)} candidate headers but tails={tails}")
    P, N, R = len(questions), population, len(questions) * population
    max_len = config.max_position_embeddings if max_cache_len is None else min(max_cache_len, config.max_position_embeddings)
    stops = list(config.eos_token_id) if stop_token_ids is None else [int(t) for t in stop_token_ids]
    stop_ids = np.full((bucket(len(stops), MIN_STOP_BUCKET),), -1, np.int32)
    stop_ids[: len(stops)] = stops
    sampling = SamplingParams.create(R, temperature=temperature, top_p=top_p)

    # Static shapes: round 0 prompt width S0, aggregation width L (fixed by the pieces), outputs G.
    q_width = max(len(q) for q in questions)
    round0 = [list(template.round0_prefix) + q + list(template.round0_suffix) for q in questions]
    S0 = bucket(max(len(p) for p in round0), MIN_PROMPT_BUCKET)
    pieces, agg_width = _pieces(template, tails)
    agg_width += q_width + tails * tail_tokens
    if max(len(p) for p in round0) + budget > max_len or (rounds and agg_width + max(budget, final_budget) > max_len):
        raise ValueError(f"budget beyond the context: prompts of up to {max(S0, agg_width)} tokens plus {budget} "
                         f"new tokens exceed the maximum length {max_len}")
    question = np.zeros((P, q_width), np.int32)
    for p, q in enumerate(questions):
        question[p, : len(q)] = q
    question_len = np.array([len(q) for q in questions], np.int32)

    out_rounds: list[RSARound] = []
    for t in range(rounds + 1):
        t0 = time.perf_counter()
        limit = final_budget if t == rounds else budget
        G = bucket(limit, MIN_OUTPUT_BUCKET)
        keys = _round_keys(seed, t, R)
        max_new = jnp.full((R,), limit, jnp.int32)
        if t == 0:
            tokens0 = np.zeros((P, S0), np.int32)
            starts0 = np.zeros((P,), np.int32)
            for p, prompt in enumerate(round0):
                tokens0[p, S0 - len(prompt):] = prompt
                starts0[p] = S0 - len(prompt)
            state = _round0(params, config, jnp.asarray(tokens0), jnp.asarray(starts0), max_len, sampling, keys,
                            max_new, jnp.asarray(stop_ids), population=N, cache_len=S0 + G, buffer_len=G,
                            moe_impl=moe_impl)
            prompt_rows = [[prompt] * N for prompt in round0]
            subsets = None
        else:
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SUBSET_SALT), t)
            prompts, lengths, subsets, _, _ = _aggregate(pieces, prev_tokens, prev_len, jnp.asarray(question),
                                                         jnp.asarray(question_len), key, tau=tail_tokens, tails=tails)
            L = prompts.shape[1]
            state = prefill_and_start(params, config, prompts, L - lengths, max_len, sampling, keys, max_new,
                                       jnp.asarray(stop_ids), cache_len=L + G, buffer_len=G, moe_impl=moe_impl)
            rows, lens = np.asarray(prompts), np.asarray(lengths)
            prompt_rows = [[rows[p * N + i, L - lens[p * N + i]:].tolist() for i in range(N)] for p in range(P)]
            subsets = np.asarray(subsets).tolist()
        state = decode_compiled(params, config, state, G, moe_impl=moe_impl)
        num_new, reason, out = (np.asarray(a) for a in (state.num_new, state.reason, state.tokens))
        gen_len = num_new - (reason == engine.STOP_TOKEN)  # the stop token is not part of the candidate
        prev_tokens = jnp.asarray(out.reshape(P, N, -1))
        prev_len = jnp.asarray(gen_len.reshape(P, N).astype(np.int32))
        tail_tok, tail_len = extract_tails(jnp.asarray(out), jnp.asarray(gen_len), tail_tokens)
        tail_tok, tail_len = np.asarray(tail_tok), np.asarray(tail_len)
        rnd = RSARound(
            candidates=[[out[p * N + i, : gen_len[p * N + i]].tolist() for i in range(N)] for p in range(P)],
            stop_reasons=[[engine.STOP_REASONS[reason[p * N + i]] for i in range(N)] for p in range(P)],
            tails=[[tail_tok[p * N + i, : tail_len[p * N + i]].tolist() for i in range(N)] for p in range(P)],
            subsets=subsets,
            prompts=prompt_rows,
            generated_tokens=int(num_new.sum()),
            seconds=time.perf_counter() - t0,
        )
        out_rounds.append(rnd)
        if progress is not None:
            progress(t, rnd)

    final = out_rounds[-1].candidates
    texts = [[tokenizer.decode(c) for c in row] for row in final] if tokenizer is not None else None
    answers = [[extract(x) for x in row] for row in (texts if texts is not None else final)]
    result = RSAResult(rounds=out_rounds, answers=answers, majority=[majority(a) for a in answers], texts=texts)
    if on_problem is not None:
        for p in range(P):
            on_problem(p, result.problem(p))
    return result


def _pieces(template: TokenTemplate, tails: int) -> tuple[dict, int]:
    """Device arrays of the template pieces, and the prompt width they take without question and tails."""
    width = max(1, max(len(h) for h in template.headers))
    headers = np.zeros((tails, width), np.int32)
    for c, h in enumerate(template.headers):
        headers[c, : len(h)] = h
    arr = lambda ids: jnp.asarray(np.asarray(ids, np.int32).reshape(-1))  # noqa: E731
    pieces = {
        "prefix": arr(template.agg_prefix), "middle": arr(template.agg_middle), "separator": arr(template.separator),
        "suffix": arr(template.agg_suffix), "headers": jnp.asarray(headers),
        "header_len": jnp.asarray([len(h) for h in template.headers], jnp.int32),
    }
    fixed = len(template.agg_prefix) + len(template.agg_middle) + len(template.agg_suffix) \
        + tails * (width + len(template.separator))
    return pieces, fixed


def _validate(config, questions, population, tails, rounds, budget, final_budget, tail_tokens):
    if not questions or any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    bad = sorted({t for q in questions for t in q if not 0 <= t < config.vocab_size})
    if bad:
        raise ValueError(f"question token id(s) {bad[:8]} outside the vocabulary [0, {config.vocab_size})")
    for name, value in (("population", population), ("tails", tails), ("budget", budget),
                        ("final_budget", final_budget), ("tail_tokens", tail_tokens)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(rounds, (int, np.integer)) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    if tails > population:
        raise ValueError(f"tails ({tails}) cannot exceed population ({population}): tails are drawn without replacement")
