"""``zaya rl``: GRPO on a JSONL file of problems with gold answers; resumable; writes a loadable model."""

from __future__ import annotations

import json
import os

from zaya_jax.cli import seed_arg

from .cli import add_run_args, add_step_args, check_run_out, closing_figure


def _rl_command(args) -> int:
    from zaya_jax.cli import resolve_model
    from zaya_jax.demo import DEFAULT_MODEL_DIR
    from zaya_jax.infer.eval_cli import token_template
    from zaya_jax.infer.evaluate import apply_prompt_template, read_dataset
    from zaya_jax.infer.rsa_cli import template_kind
    from zaya_jax.infer.tokenizer import Tokenizer

    from . import data, grpo, loop, rewards, rl_loop, step
    from .cli import mesh_arg

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
    rcfg = rl_loop.RLConfig(
        steps=args.steps, prompts=args.prompts, group=args.group, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, minibatches=args.minibatches, epochs=args.epochs, replay=not args.no_replay,
        task=args.task, population=args.population, tails=args.tails, tail_tokens=args.tail_tokens,
        agg_prompts=args.agg_prompts, agg_select=args.agg_select, mix_solve=args.mix_solve, skip_tied=args.skip_tied,
        seed=args.seed, slots=args.slots, save_every=args.save_every, keep=args.keep)
    width = rl_loop.seq_len(task, rcfg)
    if width > config.max_position_embeddings:
        raise ValueError(f"the longest prompt plus --max-new-tokens needs {width} tokens, more than the model's "
                         f"context of {config.max_position_embeddings}")
    total = rcfg.steps * rcfg.updates
    warmup = args.warmup if args.warmup is not None else 0
    tcfg = step.TrainConfig(
        learning_rate=args.lr, warmup_steps=warmup, total_steps=total, final_lr_ratio=args.final_lr_ratio,
        weight_decay=args.weight_decay, clip_norm=args.grad_clip, grad_accum=args.grad_accum,
        remat_policy=args.remat, compute_dtype=args.compute_dtype, bias_rate=args.bias_rate,
        loss_chunk=args.loss_chunk)
    objective = grpo.GRPOObjective(clip_low=args.clip_low, clip_high=args.clip_high, kl_coef=args.kl_coef,
                                   temperature=args.temperature)
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
    p.add_argument("--model", default=None, help="model directory (default: the shipped demo model)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="dtype the trained model is saved in (default: as stored); training keeps float32 masters")
    p.add_argument("--data", required=True, help='JSONL of {"question" | "problem" | "prompt", "answer", "id"?} '
                   "lines (python -m zaya_jax.demo.problems writes the demo task's)")
    p.add_argument("--limit", type=int, default=None, help="only the first LIMIT problems")
    p.add_argument("--out", required=True, help="output directory: run.json, checkpoints/, metrics.jsonl, model/")
    p.add_argument("--verifier", default="math", help="math (math-verify on the last \\boxed{}; default), exact "
                   "(string equality of the last \\boxed{}: the demo task) or module:function(text, answer) -> float")
    p.add_argument("--prompt-template", default=None, help="text around each question, with {question} "
                   "(default: the question alone), inside the model's chat template as zaya eval does")
    g = p.add_argument_group("rollouts")
    g.add_argument("--steps", type=int, default=100, help="RL steps: rollout batches (default 100)")
    g.add_argument("--prompts", type=int, default=8, help="problems per step (default 8)")
    g.add_argument("--group", type=int, default=8, help="rollouts per prompt, G (default 8)")
    g.add_argument("--max-new-tokens", type=int, default=256, help="tokens per rollout at most (default 256)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--slots", type=int, default=64, help="engine slots (default 64)")
    g.add_argument("--task", choices=("solve", "aggregate"), default="solve",
                   help="solve: roll out the problems; aggregate: roll out Markov RSA aggregation prompts built "
                        "from the policy's own round-0 samples (default solve)")
    g.add_argument("--population", type=int, default=16, help="aggregate: round-0 samples per problem, N (default 16)")
    g.add_argument("--tails", type=int, default=4, help="aggregate: candidates per prompt, C (default 4)")
    g.add_argument("--tail-tokens", type=int, default=24, help="aggregate: tokens per candidate tail (default 24)")
    g.add_argument("--agg-prompts", type=int, default=2, help="aggregate: aggregation prompts per problem, each "
                   "rolled out --group times (default 2)")
    g.add_argument("--agg-select", choices=("first", "mixed"), default="first",
                   help="aggregate: which --agg-prompts of each problem's round-1 prompts to roll out: the first, or "
                        "those whose candidates are partly right and partly wrong first (default first)")
    g.add_argument("--mix-solve", action="store_true", help="aggregate: also roll out each problem's own prompt as "
                   "one more group, so solving keeps being trained beside aggregating")
    g.add_argument("--aggregation-template", choices=("demo", "default"), default=None,
                   help="aggregate: the demo model's template or the RSA default (default: demo for the demo model)")
    o = p.add_argument_group("objective and optimizer")
    o.add_argument("--clip-low", type=float, default=0.2, help="ratio clip below 1 (default 0.2)")
    o.add_argument("--clip-high", type=float, default=0.2, help="ratio clip above 1 (default 0.2)")
    o.add_argument("--kl-coef", type=float, default=0.0, help="k3 KL penalty to the starting model (default 0: off)")
    o.add_argument("--no-replay", action="store_true", help="let the training forward route afresh instead of "
                   "replaying the rollouts' routing")
    o.add_argument("--skip-tied", action="store_true", help="leave the rollouts of groups whose rewards all tie "
                   "out of the updates (dynamic sampling; a step with no untied group makes no update)")
    o.add_argument("--minibatches", type=int, default=1, help="updates per pass over a step's rollouts (default 1)")
    o.add_argument("--epochs", type=int, default=1, help="passes over a step's rollouts (default 1)")
    o.add_argument("--lr", type=float, default=1e-6, help="peak learning rate (default 1e-6)")
    o.add_argument("--warmup", type=int, default=None, help="linear warmup updates (default 0)")
    o.add_argument("--final-lr-ratio", type=float, default=1.0, help="cosine decays to lr x this (default 1: flat)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW decay of matrices (default 0)")
    o.add_argument("--grad-clip", type=float, default=1.0, help="global gradient-norm clip (default 1.0)")
    add_step_args(o)  # the rollouts run in --compute-dtype too
    r = p.add_argument_group("run")
    r.add_argument("--save-every", type=int, default=10, help="checkpoint interval in RL steps (default 10)")
    r.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    r.add_argument("--seed", type=seed_arg, default=0, help="problem order and rollout seed (default 0)")
    add_run_args(r)
