"""Markov RSA: Zyphra's Markovian Recursive Self-Aggregation as a compiled population search.

Round 0 samples ``population`` rollouts of the question (the engine prefills the shared prompt once
and copies its cache to the members' slots). Each of ``rounds`` aggregation rounds gives every member a
prompt of the question plus ``tails`` tails drawn without replacement from the previous round only
(``tails=1``: each member continues from its own tail), and samples again. A tail is the last
``tail_tokens`` generated tokens of a candidate, stop token excluded, finished or not.

Everything per member is array code: tail extraction, subset draws and prompt assembly run in one
jitted, vmapped function, and every member is a request on the engine's slot pool (see ``RSASearch``):
problems interleave, each advancing to its next round as soon as its own round is done. Only answer
extraction and the result bookkeeping run on the host.

The settings are an ``RSAConfig`` (``zaya_jax.infer.rsa_config``: the ZAYA1 report's presets as named
constructors). Shapes: P problems, N population, C tails per prompt, tau tail tokens.
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

from .decode import inference_jit
from .engine import Engine, Request, bucket, request_keys, token_id_list
from .rsa_config import RSAConfig
from .sampling import seed_key

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


def _aggregate(pieces, tokens, gen_len, question, question_len, key, *, tau: int, tails: int):
    """tokens [P, N, Lgen], gen_len [P, N] -> (prompts [P*N, L], lengths [P*N], subsets, tails, tail_len)."""
    P, N, Lgen = tokens.shape
    tail_tok, tail_len = extract_tails(tokens.reshape(P * N, Lgen), gen_len.reshape(-1), tau)
    tail_tok, tail_len = tail_tok.reshape(P, N, tau), tail_len.reshape(P, N)
    subsets = draw_subsets(key, P, N, tails)
    prompts, lengths = assemble_prompts(pieces, tail_tok, tail_len, subsets, question, question_len)
    return prompts.reshape(P * N, -1), lengths.reshape(-1), subsets, tail_tok, tail_len


_aggregate_compiled = inference_jit(_aggregate, static_argnames=("tau", "tails"))


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
    engine_stats: dict | None = None  # markov_rsa: the engine's counters (Engine.stats) when the search ended

    @property
    def generated_tokens(self) -> int:
        return sum(r.generated_tokens for r in self.rounds)


def _round_keys(seed: int, round_index: int, members: int) -> np.ndarray:
    """Key data ``[members, 2]`` of one round. Round 0 uses generate's row keys (so ``rounds=0`` equals
    ``generate``); later rounds a salted stream. The same for every problem: a problem's samples never
    depend on which others share the run."""
    if round_index == 0:
        return request_keys(seed, np.arange(members))
    base = jax.random.fold_in(jax.random.fold_in(seed_key(seed), _ROUND_SALT), round_index)
    return np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base, jnp.arange(members))))


def markov_rsa(params, config: ZayaConfig, prompt_ids, rsa: RSAConfig | None = None, *,
               template: TokenTemplate | None = None, tokenizer=None,
               extract: Callable[[str], str | None] = extract_boxed, max_cache_len: int | None = None,
               moe_impl: str = "auto", progress: Callable[[int, RSARound], None] | None = None,
               on_problem: Callable[[int, "RSAResult"], None] | None = None, slots: int | None = None,
               engine: Engine | None = None, **settings) -> RSAResult:
    """Runs Markov RSA on one question (``prompt_ids``: the question's token ids) or several (a list of them).

    ``rsa`` holds the search's settings (``RSAConfig``, e.g. ``RSAConfig.report_light()``); its fields may
    also be given, or overridden, as keywords (``population=16, tails=4, rounds=2, budget=8192,
    tail_tokens=4096, ...``). ``template`` is a TokenTemplate; by default it is built from
    ``AggregationTemplate.default(tails)`` and ``tokenizer`` (a ``zaya_jax.infer.tokenizer.Tokenizer``),
    whose ``decode`` then feeds ``extract``.

    Problems run on an ``Engine`` (``engine``, or one of ``slots`` slots, default min(problems x
    population, 64), sized to the longest prompt plus budget): a problem's round t+1 is submitted as
    soon as its own round t is done, so problems interleave with no global round barrier, and each
    problem's result equals running it alone with the same seed. ``on_problem(p, result)`` is called
    as problem ``p`` finishes, with its part alone; ``progress(t, round)`` once round ``t`` of every
    problem is done, with that round over all problems.
    """
    rsa = RSAConfig(**settings) if rsa is None else dataclasses.replace(rsa, **settings)
    search = RSASearch(config, prompt_ids, rsa, template=template, tokenizer=tokenizer, extract=extract,
                       max_cache_len=max_cache_len, progress=progress, on_problem=on_problem)
    if engine is None:
        engine = Engine(params, config, slots=min(bucket(search.rows), 64) if slots is None else slots,
                        max_len=search.max_len, moe_impl=moe_impl)
    search.start(engine)
    while not search.done:
        engine.step()
    return dataclasses.replace(search.result, engine_stats=engine.stats())


@dataclasses.dataclass
class RoundState:
    """One problem's round in flight: its members' prompts ``[N][L]`` and subsets ``[N][C]`` (None in
    round 0), the engine requests running them and how many are not finished yet."""

    t: int
    prompts: list[list[int]]
    subsets: list[list[int]] | None
    left: int
    start: float  # time.perf_counter() at submission
    requests: list[Request] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ProblemState:
    """One problem of a search: its question's token ids, its finished rounds, its result once done."""

    question: list[int]
    rounds: list[RSARound] = dataclasses.field(default_factory=list)
    result: RSAResult | None = None


class RSASearch:
    """Markov RSA over several problems as a graph of engine requests, driven by the engine's callbacks.

    ``start(engine)`` submits every problem's round 0; each time a problem's round is complete, its next
    round's aggregation prompts are built (one compiled, vmapped program) and submitted. Whoever steps
    the engine (``markov_rsa``, or a server's loop) drives it; ``done`` / ``result`` say when it is over.
    Arguments as ``markov_rsa``; ``rsa`` is an ``RSAConfig``.
    """

    def __init__(self, config: ZayaConfig, prompt_ids, rsa: RSAConfig, *, template: TokenTemplate | None = None,
                 tokenizer=None, extract: Callable[[str], str | None] = extract_boxed,
                 max_cache_len: int | None = None, progress: Callable[[int, RSARound], None] | None = None,
                 on_problem: Callable[[int, RSAResult], None] | None = None):
        if isinstance(prompt_ids, (str, bytes)):
            raise ValueError("prompt_ids must be token ids, not text: encode the question with a tokenizer")
        if not isinstance(rsa, RSAConfig):
            raise TypeError(f"rsa must be an RSAConfig, got {type(rsa).__name__}")
        single = len(prompt_ids) > 0 and np.ndim(prompt_ids[0]) == 0
        questions = [token_id_list(prompt_ids, "a question")] if single else [
            token_id_list(q, "a question") for q in prompt_ids]
        check_questions(config, questions)
        if template is None:
            if tokenizer is None:
                raise ValueError("markov_rsa needs a `template` (TokenTemplate) or a `tokenizer` to build the default one")
            template = TokenTemplate.from_tokenizer(AggregationTemplate.default(rsa.tails), rsa.tails, tokenizer)
        if len(template.headers) != rsa.tails:
            raise ValueError(f"template has {len(template.headers)} candidate headers but tails={rsa.tails}")
        self.config, self.rsa, self.template = config, rsa, template
        # A tail is at most a whole candidate: tail_tokens >= budget is full-chain RSA, with tails no wider.
        self.tail_tokens = min(rsa.tail_tokens, rsa.budget)
        self.knobs = dict(temperature=rsa.temperature, top_p=rsa.top_p, stop_token_ids=rsa.stop_token_ids)
        self.tokenizer, self.extract = tokenizer, extract
        self.progress, self.on_problem = progress, on_problem
        self.problems = [ProblemState(q) for q in questions]
        self.rows = len(questions) * rsa.population

        context = config.max_position_embeddings if max_cache_len is None else min(max_cache_len,
                                                                                   config.max_position_embeddings)
        self._pieces = _pieces(template, rsa.tails)
        what, prompt, new = max((n for q in questions for n in context_needs(template, len(q), rsa)),
                                key=lambda n: n[1] + n[2])
        need = prompt + new
        if need > context:
            raise ValueError(f"budget beyond the context: {what} plus the new tokens need {need} tokens, more than "
                             f"the maximum length {context} (budget={rsa.budget}, final_budget={rsa.final_budget}, "
                             f"tail_tokens={rsa.tail_tokens}, tails={rsa.tails})")
        self.max_len = min(context, bucket(need, 16))
        self.need = need  # tokens the longest prompt and its new tokens take
        # Per round, filled as rounds run (never sized by ``rounds`` up front): problems done, their parts.
        self._round_done: dict[int, int] = {}
        self._round_parts: dict[int, list[RSARound | None]] = {}
        self._t0 = self._last = 0.0

    @property
    def done(self) -> bool:
        return all(p.result is not None for p in self.problems)

    def start(self, engine: Engine) -> None:
        if engine.max_len < self.need:  # refused now, not by a submit inside a later round's callback
            raise ValueError(f"the search needs a context of {self.need} tokens (round prompts plus budget); the "
                             f"engine's max_len is {engine.max_len}")
        self._engine, self._t0 = engine, time.perf_counter()
        self._last = self._t0
        for p, problem in enumerate(self.problems):
            prompt = list(self.template.round0_prefix) + problem.question + list(self.template.round0_suffix)
            self._submit(p, 0, [prompt] * self.rsa.population, None)

    def _submit(self, p: int, t: int, prompts: list[list[int]], subsets) -> None:
        state = RoundState(t=t, prompts=prompts, subsets=subsets, left=self.rsa.population, start=time.perf_counter())
        keys = _round_keys(self.rsa.seed, t, self.rsa.population)
        for i, prompt in enumerate(prompts):
            state.requests.append(self._engine.submit(
                prompt, max_new_tokens=self.rsa.round_budget(t), key=keys[i],
                on_update=lambda r, _, p=p, state=state: r.done and self._member_done(p, state), **self.knobs))

    def _member_done(self, p: int, state: RoundState) -> None:
        state.left -= 1
        if state.left:
            return
        t, reqs, population = state.t, state.requests, self.rsa.population
        gen = [r.tokens[:-1] if r.stop_reason == "stop_token" else r.tokens for r in reqs]
        width = bucket(self.rsa.round_budget(t), 16)
        tokens = np.zeros((1, population, width), np.int32)
        for i, g in enumerate(gen):
            tokens[0, i, : len(g)] = g
        gen_len = np.array([[len(g) for g in gen]], np.int32)
        tail_tok, tail_len = (np.asarray(a) for a in extract_tails(
            jnp.asarray(tokens[0]), jnp.asarray(gen_len[0]), self.tail_tokens))
        rnd = RSARound(candidates=[gen], stop_reasons=[[r.stop_reason for r in reqs]],
                       tails=[[tail_tok[i, : tail_len[i]].tolist() for i in range(population)]],
                       subsets=state.subsets, prompts=[state.prompts],
                       generated_tokens=sum(len(r.tokens) for r in reqs), seconds=time.perf_counter() - state.start)
        self.problems[p].rounds.append(rnd)
        self._round_finished(p, t, rnd)
        if t < self.rsa.rounds:
            self._submit(p, t + 1, *self._aggregation_prompts(p, t + 1, tokens, gen_len))
        else:
            self._problem_finished(p)

    def _aggregation_prompts(self, p: int, t: int, tokens: np.ndarray, gen_len: np.ndarray):
        """Round ``t``'s prompts for problem ``p`` from its previous round's outputs ``tokens [1, N, G]``."""
        q = self.problems[p].question
        question = np.zeros((1, bucket(len(q))), np.int32)
        question[0, : len(q)] = q
        key = jax.random.fold_in(jax.random.fold_in(seed_key(self.rsa.seed), _SUBSET_SALT), t)
        prompts, lengths, subsets, _, _ = _aggregate_compiled(
            self._pieces, jnp.asarray(tokens), jnp.asarray(gen_len), jnp.asarray(question),
            jnp.asarray([len(q)], jnp.int32), key, tau=self.tail_tokens, tails=self.rsa.tails)
        rows, lens = np.asarray(prompts), np.asarray(lengths)
        L = rows.shape[1]
        return [rows[i, L - lens[i]:].tolist() for i in range(self.rsa.population)], [np.asarray(subsets)[0].tolist()]

    def _round_finished(self, p: int, t: int, rnd: RSARound) -> None:
        self._round_parts.setdefault(t, [None] * len(self.problems))[p] = rnd
        self._round_done[t] = self._round_done.get(t, 0) + 1
        if self._round_done[t] == len(self.problems):
            parts = self._round_parts.pop(t)
            if self.progress is not None:
                now = time.perf_counter()
                self.progress(t, _merge_rounds(parts, now - self._last))
                self._last = now

    def _problem_finished(self, p: int) -> None:
        problem = self.problems[p]
        final = problem.rounds[-1].candidates[0]
        texts = [self.tokenizer.decode(c) for c in final] if self.tokenizer is not None else None
        answers = [self.extract(x) for x in (texts if texts is not None else final)]
        problem.result = RSAResult(rounds=problem.rounds, answers=[answers], majority=[majority(answers)],
                                   texts=None if texts is None else [texts])
        if self.on_problem is not None:
            self.on_problem(p, problem.result)

    @property
    def result(self) -> RSAResult:
        """Every problem's result together (problems in input order)."""
        if not self.done:
            raise RuntimeError("the search is still running: step its engine until `done`")
        parts = [p.result for p in self.problems]
        rounds = [_merge_rounds([r.rounds[t] for r in parts], sum(r.rounds[t].seconds for r in parts))
                  for t in range(self.rsa.rounds + 1)]
        texts = None if parts[0].texts is None else [r.texts[0] for r in parts]
        return RSAResult(rounds=rounds, answers=[r.answers[0] for r in parts],
                         majority=[r.majority[0] for r in parts], texts=texts)


def _merge_rounds(parts: list[RSARound], seconds: float) -> RSARound:
    """One round over several problems from each problem's part (lists stay [problem][member])."""
    return RSARound(candidates=[r.candidates[0] for r in parts], stop_reasons=[r.stop_reasons[0] for r in parts],
                    tails=[r.tails[0] for r in parts],
                    subsets=None if parts[0].subsets is None else [r.subsets[0] for r in parts],
                    prompts=[r.prompts[0] for r in parts], generated_tokens=sum(r.generated_tokens for r in parts),
                    seconds=seconds)


def context_needs(template: TokenTemplate, question_len: int, rsa: RSAConfig) -> list[tuple[str, int, int]]:
    """(what, prompt tokens, new tokens) at most of a question of ``question_len`` tokens: its round-0 prompt
    and, with rounds, its aggregation prompts as assembled (question and headers padded to their widths;
    tails of ``min(tail_tokens, budget)`` tokens: a tail is at most a whole candidate)."""
    final = rsa.round_budget(rsa.rounds)
    needs = [("round 0's prompt", len(template.round0_prefix) + question_len + len(template.round0_suffix),
              rsa.round_budget(0))]
    if rsa.rounds:
        tau = min(rsa.tail_tokens, rsa.budget)
        fixed = len(template.agg_prefix) + len(template.agg_middle) + len(template.agg_suffix) \
            + rsa.tails * (_header_width(template) + len(template.separator))
        needs.append((f"an aggregation prompt (question, template and {rsa.tails} tails of up to {tau} tokens)",
                      fixed + bucket(question_len) + rsa.tails * tau,
                      final if rsa.rounds == 1 else max(rsa.budget, final)))
    return needs


def _header_width(template: TokenTemplate) -> int:
    """The width each candidate header is padded to in an assembled aggregation prompt."""
    return max(1, max(len(h) for h in template.headers))


def _pieces(template: TokenTemplate, tails: int) -> dict:
    """Device arrays of the template pieces."""
    width = _header_width(template)
    headers = np.zeros((tails, width), np.int32)
    for c, h in enumerate(template.headers):
        headers[c, : len(h)] = h
    arr = lambda ids: jnp.asarray(np.asarray(ids, np.int32).reshape(-1))  # noqa: E731
    pieces = {
        "prefix": arr(template.agg_prefix), "middle": arr(template.agg_middle), "separator": arr(template.separator),
        "suffix": arr(template.agg_suffix), "headers": jnp.asarray(headers),
        "header_len": jnp.asarray([len(h) for h in template.headers], jnp.int32),
    }
    return pieces


def check_questions(config: ZayaConfig, questions: Sequence[Sequence[int]]) -> None:
    """Raises ValueError naming the first question (token-id list) a search cannot run: empty, or holding
    ids outside the vocabulary. The settings are ``RSAConfig``'s to check."""
    if not questions or any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    bad = sorted({t for q in questions for t in q if not 0 <= t < config.vocab_size})
    if bad:
        raise ValueError(f"question token id(s) {bad[:8]} outside the vocabulary [0, {config.vocab_size})")
