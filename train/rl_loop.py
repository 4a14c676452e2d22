"""The GRPO loop: rollouts on the engine, rewards, advantages, several clipped updates, checkpoints.

Each RL step: take the step's prompts (a function of the seed and the step), sample ``group`` rollouts
of each with the current params on a recording engine (temperature 1 by default), score them with the
verifier, turn rewards into group-relative advantages, and run ``epochs`` passes of ``minibatches``
updates of ``step.train_step`` with ``grpo.GRPOObjective`` (the ratio against the engine's log-probs,
the rollout's routing replayed). Output directory, as ``zaya train``'s::

    run.json          the run's settings; a resume must match them exactly
    checkpoints/      orbax steps: the train state and the RL step reached
    metrics.jsonl     one line per RL step
    model/            the trained model (zaya_jax.load / zaya export)

Everything random is a function of (seed, step), so ``--resume`` after a kill repeats the same
rollouts and updates bit for bit.

Tasks: ``solve`` rolls out each problem's prompt (the ``zaya eval`` round-0 prompt). ``aggregate``
first samples ``population`` round-0 solutions of each problem with the current policy, then builds
Markov RSA aggregation prompts from them with ``markov_rsa`` itself (the prompts its round 1 would
see) and rolls out ``agg_prompts`` of them per problem, rewarding a correct final answer
(``agg_select="mixed"``: the prompts whose candidates disagree in correctness first); ``mix_solve`` also
rolls out each problem's own prompt as one more group, so that solving keeps being trained beside
aggregating (the policy's samples are the aggregator's candidates).

``skip_tied`` (dynamic sampling, as DAPO): groups whose rewards all tie carry no policy gradient, so
their rollouts are left out of the updates instead of diluting the token mean; the remaining rows are
padded up to a power-of-two bucket (a few compiled shapes), and a step with no untied group makes no
update at all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from zaya_jax import dtypes, quant
from zaya_jax.config import ZayaConfig
from zaya_jax.infer.engine import Engine
from zaya_jax.infer.rsa import TokenTemplate, markov_rsa
from zaya_jax.infer.rsa_config import RSAConfig
from zaya_jax.model import cast_params

from . import checkpoints, grpo, loss, rollout
from .loop import Sharded, finish, open_out, setting_defaults, truncate_log
from .step import TrainConfig, full_params, init_state, make_train_step

TASKS = ("solve", "aggregate")
AGG_SELECT = ("first", "mixed")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Loop settings. ``steps`` RL steps of ``prompts`` problems x ``group`` rollouts (x ``agg_prompts``
    aggregation prompts per problem for ``aggregate``); each step makes ``epochs x minibatches`` updates."""

    steps: int
    prompts: int = 8
    group: int = 8
    max_new_tokens: int = 256
    temperature: float = 1.0
    minibatches: int = 1
    epochs: int = 1
    replay: bool = True
    task: str = "solve"
    population: int = 16
    tails: int = 4
    tail_tokens: int = 24
    agg_prompts: int = 2
    agg_select: str = "first"
    mix_solve: bool = False
    skip_tied: bool = False
    seed: int = 0
    slots: int = 64
    save_every: int = 10
    keep: int = 3

    def __post_init__(self):
        for name in ("steps", "prompts", "group", "max_new_tokens", "minibatches", "epochs", "population", "tails",
                     "tail_tokens", "agg_prompts", "slots", "save_every", "keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group < 2:
            raise ValueError(f"group must be >= 2 (advantages are relative to the group), got {self.group}")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.agg_select not in AGG_SELECT:
            raise ValueError(f"agg_select must be one of {AGG_SELECT}, got {self.agg_select!r}")
        if not 0 < self.temperature < math.inf:
            raise ValueError(f"temperature must be finite and > 0 (rollouts are sampled), got {self.temperature}")
        if self.mix_solve and self.task != "aggregate":
            raise ValueError("mix_solve adds solve groups to an aggregate run; a solve run has only those")
        if self.task == "aggregate" and not (self.tails <= self.population and self.agg_prompts <= self.population):
            raise ValueError(f"tails ({self.tails}) and agg_prompts ({self.agg_prompts}) cannot exceed population "
                             f"({self.population})")
        if self.batch_size % self.minibatches:
            raise ValueError(f"{self.batch_size} rollouts per step do not split into {self.minibatches} minibatches")

    @property
    def groups(self) -> int:
        """Groups (prompts rolled out ``group`` times) per step."""
        return self.prompts * (self.agg_prompts + self.mix_solve if self.task == "aggregate" else 1)

    @property
    def batch_size(self) -> int:
        return self.groups * self.group

    @property
    def updates(self) -> int:
        """Optimizer steps per RL step."""
        return self.epochs * self.minibatches


@dataclasses.dataclass(frozen=True)
class Task:
    """What the loop needs about the problems: ``questions[i]`` token ids, ``answers[i]`` gold strings,
    the run's ``rsa.TokenTemplate``, ``decode(ids) -> str``, ``verify(text, answer) -> reward`` and the
    stop tokens."""

    questions: list[list[int]]
    answers: list[str]
    template: TokenTemplate
    decode: Callable[[Sequence[int]], str]
    verify: Callable[[str, str], float]
    stop_token_ids: tuple[int, ...] | None = None

    def round0_prompt(self, i: int) -> list[int]:
        t = self.template
        return list(t.round0_prefix) + list(self.questions[i]) + list(t.round0_suffix)


def seq_len(task: Task, rcfg: RLConfig) -> int:
    """Tokens per training row (and the engine's max_len): the longest prompt the run can build plus
    ``max_new_tokens``, rounded up to 16."""
    t, q = task.template, max(len(x) for x in task.questions)
    prompt = len(t.round0_prefix) + q + len(t.round0_suffix)
    if rcfg.task == "aggregate":
        prompt = max(prompt, len(t.agg_prefix) + q + len(t.agg_middle) + len(t.agg_suffix) + sum(map(len, t.headers))
                     + rcfg.tails * (min(rcfg.tail_tokens, rcfg.max_new_tokens) + len(t.separator)))
    return -(-(prompt + rcfg.max_new_tokens) // 16) * 16


def step_problems(n: int, rcfg: RLConfig, step: int) -> list[int]:
    """Problem indices of RL step ``step`` (1-based): epochs over the data, each in its own shuffled order."""
    first = (step - 1) * rcfg.prompts
    out = []
    for pos in range(first, first + rcfg.prompts):
        epoch, i = divmod(pos, n)
        out.append(int(np.random.default_rng([rcfg.seed, epoch]).permutation(n)[i]))
    return out


def step_seed(rcfg: RLConfig, step: int) -> int:
    """An int seed of its own for each step (``RSAConfig.seed`` is an int)."""
    return int(np.random.default_rng([rcfg.seed, step, 0x52534147]).integers(2 ** 31))


def make_rollouts(engine: Engine, task: Task, rcfg: RLConfig, step: int):
    """The step's rollouts, the gold answer of each, and extra metrics (aggregate: round-0 accuracy)."""
    ids = step_problems(len(task.questions), rcfg, step)
    extra = {}
    if rcfg.task == "solve":
        prompts, answers = [task.round0_prompt(i) for i in ids], [task.answers[i] for i in ids]
    else:
        rsa = RSAConfig(population=rcfg.population, tails=rcfg.tails, rounds=1, budget=rcfg.max_new_tokens,
                        tail_tokens=rcfg.tail_tokens, final_budget=1, temperature=rcfg.temperature,
                        seed=step_seed(rcfg, step), stop_token_ids=task.stop_token_ids)
        search = markov_rsa(engine.params, engine.config, [task.questions[i] for i in ids], rsa,
                            template=task.template, engine=engine)
        # Only round 1's prompts are used: they are built from the policy's own round-0 samples.
        round0 = np.array([[task.verify(task.decode(c), task.answers[i]) > 0 for c in cands]
                           for i, cands in zip(ids, search.rounds[0].candidates)])
        prompts = [search.rounds[1].prompts[p][m] for p in range(len(ids))
                   for m in agg_members(round0[p], search.rounds[1].subsets[p], rcfg)]
        answers = [task.answers[i] for i in ids for _ in range(rcfg.agg_prompts)]
        if rcfg.mix_solve:
            prompts += [task.round0_prompt(i) for i in ids]
            answers += [task.answers[i] for i in ids]
        extra["round0_accuracy"] = float(round0.mean())
    rolls = rollout.sample(engine, prompts, group=rcfg.group, max_new_tokens=rcfg.max_new_tokens, seed=rcfg.seed,
                           step=step, temperature=rcfg.temperature, stop_token_ids=task.stop_token_ids)
    return rolls, [a for a in answers for _ in range(rcfg.group)], extra


def agg_members(correct, subsets, rcfg: RLConfig) -> list[int]:
    """The ``agg_prompts`` round-1 members of one problem to roll out. ``first``: the first ones;
    ``mixed``: those whose candidates are some right, some wrong first (where choosing matters), then
    the rest, each part in member order. correct: [N] bool, round 0; subsets: [N][C] candidate indices."""
    members = list(range(len(subsets)))
    if rcfg.agg_select == "mixed":
        members.sort(key=lambda m: len({bool(correct[c]) for c in subsets[m]}) == 1)
    return members[: rcfg.agg_prompts]


def tied_groups(advantages, group: int) -> np.ndarray:
    """[groups] bool: groups whose advantages are all zero (their rewards tie; ``grpo.group_advantages``)."""
    return np.all(np.asarray(advantages).reshape(-1, group) == 0, axis=1)


def update_size(rows: int, minibatch: int, group: int, grad_accum: int) -> int:
    """Rows of an update holding ``rows`` rollouts: a power of two, at least ``group``, at most ``minibatch``
    and a multiple of ``grad_accum`` (so skipping tied groups compiles only a few batch shapes)."""
    size = min(minibatch, max(group, 1 << max(rows - 1, 0).bit_length()))
    return min(minibatch, -(-size // grad_accum) * grad_accum)


def minibatches(batch: dict, rows: np.ndarray, count: int, size: int):
    """``count`` minibatches of ``rows`` (in order), each padded to ``size`` rows with copies of its own rows
    whose ``loss_mask`` and advantage are zero (they add no loss and no token to the mean)."""
    per = -(-len(rows) // count)
    for k in range(count):
        part = rows[k * per:(k + 1) * per]
        if len(part) == 0:
            continue
        idx = np.concatenate([part, part[np.arange(size - len(part)) % len(part)]])
        mb = {key: value[idx] for key, value in batch.items()}
        mb["loss_mask"][len(part):] = 0
        mb["advantages"][len(part):] = 0
        yield mb


def train_rl(config: ZayaConfig, params: dict, task: Task, tcfg: TrainConfig, rcfg: RLConfig,
             objective: grpo.GRPOObjective, out: str, *, resume: bool = False, force: bool = False, mesh=None,
             data_settings: dict | None = None, progress: bool = True, save_model: bool = True,
             assets_from: str | None = None):
    """Runs ``rcfg.steps`` GRPO steps on ``params`` (from the latest checkpoint when ``resume``); returns the
    final ``TrainState``. ``tcfg.total_steps`` must be ``rcfg.steps x rcfg.updates`` (one schedule over
    every update). ``out``, ``resume``, ``force``, ``data_settings``, ``save_model`` and ``assets_from``
    as ``loop.train``."""
    if tcfg.total_steps != rcfg.steps * rcfg.updates:
        raise ValueError(f"tcfg.total_steps ({tcfg.total_steps}) must be steps x epochs x minibatches "
                         f"({rcfg.steps * rcfg.updates})")
    if objective.temperature != rcfg.temperature:
        # The ratio needs the training forward's distribution to be the one the rollouts were sampled from.
        raise ValueError(f"objective.temperature ({objective.temperature}) must be the rollouts' temperature "
                         f"({rcfg.temperature})")
    if (rcfg.batch_size // rcfg.minibatches) % tcfg.grad_accum:
        raise ValueError(f"minibatches of {rcfg.batch_size // rcfg.minibatches} rollouts do not split into "
                         f"{tcfg.grad_accum} micro-batches")
    quant.require_float(params, "RL training")
    settings = {"train": dataclasses.asdict(tcfg), "grpo": dataclasses.asdict(objective),
                "rl": {k: v for k, v in dataclasses.asdict(rcfg).items() if k not in ("save_every", "keep", "slots")},
                "data": data_settings or {}}
    with open_out(out, settings, resume, force,
                  setting_defaults(train=TrainConfig, grpo=grpo.GRPOObjective, rl=RLConfig)):
        model_dtype, dtype = params["embed"].dtype, dtypes.resolve(tcfg.compute_dtype)
        # The frozen reference: the starting model (a copy: the state may share the params' buffers, and is donated).
        ref = jax.tree.map(jnp.copy, cast_params(params, dtype)) if objective.kl_coef else None
        state = init_state(params, tcfg)
        del params
        width = seq_len(task, rcfg)
        minibatch = rcfg.batch_size // rcfg.minibatches
        shard = Sharded(mesh, config, state, tcfg, minibatch) if mesh is not None else None
        if shard is not None:
            state = jax.device_put(state, shard.state)

        mngr = checkpoints.manager(os.path.join(out, "checkpoints"), save_every=rcfg.save_every, keep=rcfg.keep,
                                   asynchronous=mesh is None or mesh.size == 1)
        start, log_file = 0, os.path.join(out, "metrics.jsonl")
        if resume:
            if mngr.latest_step() is not None:  # killed before its first checkpoint: start over
                state, data_state, _ = checkpoints.restore(mngr, state)
                start = data_state["rl_step"]
            truncate_log(log_file, start)
        step_fns = {}  # update rows -> (compiled step, batch sharding): one unless skip_tied pads to smaller buckets

        def step_fn(state, mb):
            size = len(mb["tokens"])
            if size not in step_fns:
                if shard is None:
                    step_fns[size] = (make_train_step(config, tcfg, objective=objective), None)
                else:
                    placed = shard.batch_for(size)
                    step_fns[size] = (make_train_step(config, tcfg, objective=objective, state_sharding=shard.state,
                                                      batch_sharding=placed, metrics_sharding=shard.metrics), placed)
            run, placed = step_fns[size]
            return run(state, mb if placed is None else jax.device_put(mb, placed))

        ref_fn = jax.jit(lambda p, tokens, mask: loss.next_token_logprobs(
            p, config, tokens, mask, chunk=tcfg.loss_chunk, moe_impl=tcfg.moe_impl,
            temperature=rcfg.temperature)[0]) if ref is not None else None

        bar = tqdm(total=rcfg.steps, initial=start, desc="rl", unit="step", disable=not progress, dynamic_ncols=True)
        with open(log_file, "a") as log, (jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()):
            for step_no in range(start + 1, rcfg.steps + 1):
                t0 = time.perf_counter()
                engine = Engine(cast_params(full_params(state), dtype), config, slots=rcfg.slots, max_len=width,
                                moe_impl=tcfg.moe_impl, mesh=mesh, record=True)
                rolls, answers, extra = make_rollouts(engine, task, rcfg, step_no)
                del engine  # it holds the state's buffers, which the train step donates
                rewards = np.array([task.verify(task.decode(t), a) for t, a in zip(rolls.tokens, answers)], np.float32)
                advantages = grpo.group_advantages(rewards, rcfg.group)
                if rcfg.mix_solve:  # the solve groups come last
                    extra["solve_accuracy"] = float(np.mean(rewards[-rcfg.prompts * rcfg.group:] > 0))
                batch = rollout.to_batch(rolls, advantages, width, replay=rcfg.replay)
                live = np.arange(rcfg.batch_size)
                if rcfg.skip_tied:
                    live = live[np.repeat(~tied_groups(advantages, rcfg.group), rcfg.group)]
                if ref_fn is not None and len(live):
                    batch["ref_logprobs"] = np.asarray(ref_fn(ref, batch["tokens"], batch["mask"]))
                t1 = time.perf_counter()
                updates = []
                size = update_size(-(-len(live) // rcfg.minibatches), minibatch, rcfg.group, tcfg.grad_accum)
                for epoch in range(rcfg.epochs):
                    order = live[np.random.default_rng([rcfg.seed, step_no, epoch]).permutation(len(live))]
                    for mb in minibatches(batch, order, rcfg.minibatches, size):
                        state, metrics = step_fn(state, mb)
                        updates.append(metrics)
                updates = jax.device_get(updates)
                t2 = time.perf_counter()
                record = _record(step_no, rewards, advantages, rolls, updates, t0, t1, t2, extra, rcfg.group)
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward_mean']:.3f}", gap=f"{record.get('logprob_gap', 0):.1e}",
                                tok_s=f"{record['rollout_tokens_per_s']:.0f}")
                if shard is not None and mngr.should_save(step_no):
                    jax.block_until_ready(state)  # see checkpoints.manager: no collectives in flight during a save
                checkpoints.save(mngr, step_no, state, {"rl_step": step_no}, force=step_no == rcfg.steps)
        bar.close()
        finish(mngr, config, state, model_dtype, out, save_model, assets_from)
        return state


def _record(step, rewards, advantages, rolls, updates, t0, t1, t2, extra, group) -> dict:
    """One metrics.jsonl line: the rollouts' rewards and lengths, the updates' means, timings."""
    mean = lambda key: float(np.mean([u[key] for u in updates])) if updates and key in updates[0] else None  # noqa: E731
    ties = tied_groups(advantages, group)
    last = updates[-1] if updates else None  # a step with every group tied and skip_tied makes no update
    record = {
        "step": step, "reward_mean": float(rewards.mean()), "accuracy": float(np.mean(rewards > 0)),
        "response_length": float(np.mean([len(t) for t in rolls.tokens])),
        "tied_groups": float(ties.mean()), "advantage_abs": float(np.abs(advantages).mean()),
        # The first update runs at the rollout's params: its gap is the engine-vs-training log-prob gap.
        "logprob_gap": float(updates[0]["max_logprob_gap"]) if updates else None,
        "loss": mean("loss"), "kl": mean("kl"), "entropy": mean("entropy"), "clip_fraction": mean("clip_fraction"),
        "ratio": mean("ratio"), "grad_norm": mean("grad_norm"), "updates": len(updates),
        "lr": float(last["lr"]) if last else None,
        "max_load_ratio": np.asarray(last["max_load_ratio"], np.float64).round(4).tolist() if last else None,
        "rollout_tokens": rolls.generated, "rollout_tokens_per_s": round(rolls.generated / max(t1 - t0, 1e-9), 2),
        "train_tokens_per_s": round(sum(float(u["tokens"]) for u in updates) / max(t2 - t1, 1e-9), 2),
        "rollout_s": round(t1 - t0, 3), "train_s": round(t2 - t1, 3),
        **extra,
    }
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items() if v is not None}
