"""Dynamic sampling (``zaya rl --skip-tied``) and the aggregation prompts' selection (``--agg-select``):
tied groups leave the updates without changing what the other rows contribute; a step whose groups all
tie makes no update; mixed-candidate aggregation prompts come first."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import zaya_jax
from helpers import CONFIG, write_rl_problem_set
from zaya_jax import cli
from zaya_jax.train import grpo, loss, rl_loop


def test_update_size_buckets():
    sizes = {rl_loop.update_size(rows, 64, 8, 1) for rows in range(1, 65)}
    assert sizes == {8, 16, 32, 64}  # few compiled shapes
    for rows in range(1, 65):
        size = rl_loop.update_size(rows, 64, 8, 4)
        assert rows <= size <= 64 and size % 4 == 0
    assert rl_loop.update_size(40, 48, 8, 1) == 48  # capped at the full minibatch


def test_minibatches_pad_with_masked_copies():
    B, S = 12, 6
    batch = {"tokens": np.arange(B * S).reshape(B, S), "mask": np.ones((B, S), np.int32),
             "loss_mask": np.ones((B, S), np.int32), "advantages": np.linspace(-1, 1, B).astype(np.float32)}
    rows = np.array([7, 2, 9, 4, 11])
    out = list(rl_loop.minibatches(batch, rows, 2, 4))
    assert [len(mb["tokens"]) for mb in out] == [4, 4]
    real = [3, 2]  # ceil(5 / 2) rows, then the rest
    seen = np.concatenate([mb["tokens"][:n, 0] // S for mb, n in zip(out, real)])
    np.testing.assert_array_equal(seen, rows)  # every live row once, in order
    for mb, n in zip(out, real):
        assert np.all(mb["loss_mask"][n:] == 0) and np.all(mb["advantages"][n:] == 0)
        assert np.all(mb["loss_mask"][:n] == 1)
    assert np.all(batch["loss_mask"] == 1)  # the step's batch is untouched


def test_padding_rows_add_nothing_to_the_objective():
    """The objective's sum and token count over live rows equal those over the same rows padded with
    masked copies: the padding neither adds loss nor dilutes the token mean."""
    params = zaya_jax.model.init(CONFIG, jax.random.key(0))
    B, S, P = 3, 10, 4
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (B, S), 0, CONFIG.vocab_size), np.int32)
    mask = np.ones((B, S), np.int32)
    loss_mask = np.zeros((B, S), np.int32)
    loss_mask[:, P:] = 1
    old = np.asarray(loss.next_token_logprobs(params, CONFIG, tokens, mask)[0]) - 0.05
    batch = {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "old_logprobs": old,
             "advantages": np.array([1.0, -0.5, 0.25], np.float32)}
    padded = next(rl_loop.minibatches(batch, np.arange(B), 1, 8))
    objective = grpo.GRPOObjective()
    tcfg = zaya_jax.train.step.TrainConfig()
    total, (count, _, _) = objective(params, CONFIG, batch, tcfg)
    total_p, (count_p, _, _) = objective(params, CONFIG, padded, tcfg)
    assert float(count) == float(count_p) == B * (S - P)
    np.testing.assert_allclose(float(total_p), float(total), rtol=1e-6)


def test_agg_members_mixed_first():
    correct = np.array([True, True, False, True])
    subsets = [[0, 1], [0, 2], [1, 3], [2, 2]]  # all right, mixed, all right, all wrong
    rcfg = rl_loop.RLConfig(steps=1, task="aggregate", population=4, tails=2, agg_prompts=2, agg_select="mixed")
    assert rl_loop.agg_members(correct, subsets, rcfg) == [1, 0]
    assert rl_loop.agg_members(correct, subsets, dataclasses.replace(rcfg, agg_select="first")) == [0, 1]
    with pytest.raises(ValueError, match="agg_select"):
        dataclasses.replace(rcfg, agg_select="best")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_dynamic")
    write_rl_problem_set(root, 4)
    return root


def _run(root, out, verifier, *extra):
    argv = ["rl", str(root / "model"), "--data", str(root / "data.jsonl"), "--out", str(out),
            "--steps", "1", "--prompts", "2", "--group", "4", "--max-new-tokens", "5", "--minibatches", "2",
            "--lr", "1e-2", "--verifier", verifier, "--slots", "8", "--no-progress", "--skip-tied", *extra]
    assert cli.main(argv) == 0
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def test_all_tied_steps_make_no_update(model_dir, tmp_path):
    records = _run(model_dir, tmp_path / "run", "helpers:constant_reward", "--task", "aggregate", "--population", "4",
                   "--tails", "2", "--agg-prompts", "1", "--agg-select", "mixed", "--mix-solve")
    assert [r["tied_groups"] for r in records] == [1.0]
    assert records[0]["solve_accuracy"] == 1.0  # --mix-solve: the solve groups are rolled out and scored too
    assert [r["updates"] for r in records] == [0] and "loss" not in records[0]
    before, after = zaya_jax.load(str(model_dir / "model"))[1], zaya_jax.load(str(tmp_path / "run" / "model"))[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_untied_groups_are_trained(model_dir, tmp_path):
    (record,) = _run(model_dir, tmp_path / "run", "helpers:digit_reward", "--temperature", "0.8")
    assert record["tied_groups"] < 1  # the digit count varies within a group
    assert record["updates"] == 2 and record["loss"] != 0
    assert record["logprob_gap"] <= 1e-4  # the objective scores the rollouts at their own temperature


def test_mix_solve_adds_one_solve_group_per_problem():
    rcfg = rl_loop.RLConfig(steps=1, prompts=2, group=4, task="aggregate", population=4, tails=2, agg_prompts=1,
                            mix_solve=True)
    assert rcfg.groups == 4 and rcfg.batch_size == 16  # per problem: one aggregation group, one solve group
    with pytest.raises(ValueError, match="mix_solve adds solve groups to an aggregate run"):
        rl_loop.RLConfig(steps=1, mix_solve=True)
