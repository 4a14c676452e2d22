"""``zaya rl``: GRPO on a JSONL file of problems with gold answers; resumable; writes a loadable model."""

from __future__ import annotations

import json
import os

from zaya_jax.cli import seed_arg

from .cli import add_model_dtype_args, add_run_args, add_step_args, check_run_out, closing_figure, from_args, mesh_arg
from .grpo import GRPOObjective
from .rl_loop import AGG_SELECT, TASKS, RLConfig
from .step import TrainConfig

# GRPO's learning-rate schedule where it differs from fine-tuning's (TrainConfig): small, flat, no decay.
RL_OPTIMIZER = {"learning_rate": 1e-6, "warmup_steps": 0, "final_lr_ratio": 1.0, "weight_decay": 0.0}


def _rl_command(args) -> int:
    from zaya_jax.cli import resolve_model
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.infer.evaluate import apply_prompt_template, read_dataset
    from zaya_jax.infer.rsa_modes import template_kind, token_template
    from zaya_jax.infer.tokenizer import Tokenizer

    from . import data, loop, rewards, rl_loop

    check_run_out(args)
    problems = read_dataset(args.data, args.limit)
    verify = rewards.load_verifier(args.verifier)
    verify(f"\\boxed{{{problems[0].answer}}}", problems[0].answer)  # a broken verifier fails before --out is made
    mesh = mesh_arg(args.mesh)
    config, params, desc = resolve_model(args.model, args.dtype, args.allow_non_finite)
    model_dir = args.model or DEFAULT_MODEL_DIR
    tokenizer = Tokenizer.from_dir(model_dir)
    kind = template_kind(args.model, args.aggregation_template)
    task = rl_loop.Task(
        questions=[tokenizer.encode(apply_prompt_template(args.prompt_template, p.question), add_special_tokens=False,
                                    max_tokens=config.max_position_embeddings) for p in problems],
        answers=[p.answer for p in problems], template=token_template(kind, args.tails, tokenizer),
        decode=tokenizer.decode, verify=verify)
    rcfg = from_args(RLConfig, args)
    width = rl_loop.seq_len(task, rcfg)
    if width > config.max_position_embeddings:
        raise ValueError(f"the longest prompt plus --max-new-tokens needs {width} tokens, more than the model's "
                         f"context of {config.max_position_embeddings}")
    tcfg = from_args(TrainConfig, args, total_steps=rcfg.steps * rcfg.updates)
    objective = from_args(GRPOObjective, args)
    print(f"model: {desc}\ndata: {len(problems)} problems from {args.data}; {rcfg.batch_size} rollouts of up to "
          f"{width} tokens per step, {rcfg.updates} update(s) each")
    data_settings = {"model": os.path.abspath(args.model) if args.model else None,
                     "data": os.path.abspath(args.data), "sha256": data.file_sha256(args.data),
                     "problems": len(problems), "verifier": args.verifier, "prompt_template": args.prompt_template,
                     "aggregation_template": kind}
    state = rl_loop.train_rl(config, params, task, tcfg, rcfg, objective, args.out, resume=args.resume,
                             force=args.force, mesh=mesh, data_settings=data_settings,
                             progress=not args.no_progress, assets_from=model_dir)
    summary = {"steps": rcfg.steps, "updates": int(state.step),
               "reward_mean": loop.last_metrics(args.out).get("reward_mean"),
               "model": os.path.join(args.out, "model"), "metrics": os.path.join(args.out, "metrics.jsonl")}
    print(json.dumps(summary) if args.json else
          f"done: {summary['steps']} RL steps ({summary['updates']} updates), last reward mean "
          f"{closing_figure(summary['reward_mean'], 3)}; model in {summary['model']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "rl", help="GRPO reinforcement learning on problems with verifiable answers (JSONL, the zaya eval format)",
        description="Each step samples --group rollouts of --prompts problems with the current params on the "
                    "engine, rewards them with the verifier, and makes --epochs x --minibatches clipped policy-"
                    "gradient updates with group-relative advantages, replaying the rollouts' expert routing. "
                    "--task aggregate trains on Markov RSA aggregation prompts built from the policy's own "
                    "samples instead. Writes --out/metrics.jsonl, checkpoints/ and model/.")
    p.set_defaults(func=_rl_command)
    add_model_dtype_args(p)
    p.add_argument("--data", required=True, help='JSONL of {"question" | "problem" | "prompt", "answer", "id"?} '
                   "lines (python -m zaya_jax.demo.problems writes the demo task's)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.add_argument("--out", required=True, help="output directory: run.json, checkpoints/, metrics.jsonl, model/")
    p.add_argument("--verifier", default="math", help="math (math-verify on the last \\boxed{}; default), exact "
                   "(string equality of the last \\boxed{}: the demo task) or module:function(text, answer) -> float")
    p.add_argument("--prompt-template", default=None, help="text around each question, with {question} "
                   "(default: the question alone), inside the model's chat template as zaya eval does")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=int, default=100, help="RL steps: rollout batches (default %(default)s)")
    g.add_argument("--prompts", type=int, default=RLConfig.prompts, help="problems per step (default %(default)s)")
    g.add_argument("--group", type=int, default=RLConfig.group, help="rollouts per prompt, G (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=RLConfig.max_new_tokens,
                   help="tokens per rollout at most (default %(default)s)")
    g.add_argument("--temperature", type=float, default=RLConfig.temperature,
                   help="sampling temperature (default %(default)s)")
    g.add_argument("--slots", type=int, default=RLConfig.slots, help="engine slots (default %(default)s)")
    g.add_argument("--task", choices=TASKS, default=RLConfig.task,
                   help="solve: roll out the problems; aggregate: roll out Markov RSA aggregation prompts built "
                        "from the policy's own round-0 samples (default %(default)s)")
    g.add_argument("--population", type=int, default=RLConfig.population,
                   help="aggregate: round-0 samples per problem, N (default %(default)s)")
    g.add_argument("--tails", type=int, default=RLConfig.tails,
                   help="aggregate: candidates per prompt, C (default %(default)s)")
    g.add_argument("--tail-tokens", type=int, default=RLConfig.tail_tokens,
                   help="aggregate: tokens per candidate tail (default %(default)s)")
    g.add_argument("--agg-prompts", type=int, default=RLConfig.agg_prompts, help="aggregate: aggregation prompts "
                   "per problem, each rolled out --group times (default %(default)s)")
    g.add_argument("--agg-select", choices=AGG_SELECT, default=RLConfig.agg_select,
                   help="aggregate: which --agg-prompts of each problem's round-1 prompts to roll out: the first, or "
                        "those whose candidates are partly right and partly wrong first (default %(default)s)")
    g.add_argument("--mix-solve", action="store_true", default=RLConfig.mix_solve, help="aggregate: also roll out "
                   "each problem's own prompt as one more group, so solving keeps being trained beside aggregating")
    g.add_argument("--aggregation-template", choices=("demo", "default"), default=None,
                   help="aggregate: the demo model's template or the RSA default (default: demo for the demo model)")
    o = p.add_argument_group("objective and optimizer")
    o.add_argument("--clip-low", type=float, default=GRPOObjective.clip_low,
                   help="ratio clip below 1 (default %(default)s)")
    o.add_argument("--clip-high", type=float, default=GRPOObjective.clip_high,
                   help="ratio clip above 1 (default %(default)s)")
    o.add_argument("--kl-coef", type=float, default=GRPOObjective.kl_coef,
                   help="k3 KL penalty to the starting model (default %(default)s: off)")
    o.add_argument("--no-replay", dest="replay", action="store_false", default=RLConfig.replay,
                   help="let the training forward route afresh instead of replaying the rollouts' routing")
    o.add_argument("--skip-tied", action="store_true", default=RLConfig.skip_tied, help="leave the rollouts of "
                   "groups whose rewards all tie out of the updates (dynamic sampling; a step with no untied group "
                   "makes no update)")
    o.add_argument("--minibatches", type=int, default=RLConfig.minibatches,
                   help="updates per pass over a step's rollouts (default %(default)s)")
    o.add_argument("--epochs", type=int, default=RLConfig.epochs,
                   help="passes over a step's rollouts (default %(default)s)")
    add_step_args(o, "linear warmup updates (default %(default)s)")  # the rollouts run in --compute-dtype too
    p.set_defaults(**RL_OPTIMIZER)
    r = p.add_argument_group("run")
    r.add_argument("--save-every", type=int, default=RLConfig.save_every,
                   help="checkpoint interval in RL steps (default %(default)s)")
    r.add_argument("--keep", type=int, default=RLConfig.keep, help="checkpoints kept (default %(default)s)")
    r.add_argument("--seed", type=seed_arg, default=RLConfig.seed,
                   help="problem order and rollout seed (default %(default)s)")
    add_run_args(r)
