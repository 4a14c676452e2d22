"""The demo: task generator, training data, the shipped model (vs transformers) and `zaya demo`."""

import json
import random

import numpy as np
import pytest
import torch
import transformers

import zaya_jax
from zaya_jax.cli import main
from zaya_jax.demo import DEFAULT_MODEL_DIR, arith, data
from zaya_jax.infer.rsa import extract_boxed


def test_problems_are_fixed_and_splits_disjoint():
    assert arith.problems("test", 5) == arith.problems("test", 5)
    train = {arith.problem("train", i).terms for i in range(2000)}
    test = [arith.problem("test", i).terms for i in range(200)]
    assert not any(t in train for t in test)  # disjoint by construction
    assert all(arith.held_out(t) for t in test) and not any(arith.held_out(t) for t in train)
    for p in arith.problems("test", 50):
        assert arith.MIN_TERMS <= len(p.terms) <= arith.MAX_TERMS
        assert extract_boxed(p.solution()) == str(sum(p.terms)) == p.answer
        lines = p.solution().split("\n")[:-1]
        assert all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in lines)  # noqa: S307


def test_corrupted_solutions_end_wrong():
    rng = random.Random(0)
    for p in arith.problems("train", 50):
        wrong = p.solution(rng.randrange(len(p.terms) - 1), rng)
        assert not arith.is_correct(extract_boxed(wrong), p)


def test_aggregation_records_use_the_rsa_template():
    rng = random.Random(1)
    p = arith.problem("train", 3)
    record = data.aggregate_record(p, rng)
    user, assistant = record["messages"]
    assert assistant["content"] == data.final_step(p) and p.solution().endswith("\n" + data.final_step(p))
    assert user["content"].startswith(data.TEMPLATE.intro + p.question + data.TEMPLATE.before_candidates)
    assert user["content"].count("#") == data.TAILS and user["content"].endswith(data.TEMPLATE.closing)


def test_shipped_model_matches_transformers():
    config, params = zaya_jax.load(DEFAULT_MODEL_DIR)
    ref = transformers.ZayaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():  # from_pretrained resets the skip-route bias; put the stored values back
        for layer, biases in zip(ref.model.layers, np.asarray(params["layers"]["router"]["balancing_biases"])):
            layer.mlp.gate.balancing_biases.copy_(torch.as_tensor(biases))
    ids = np.array([[2, 3, 20, 21, 9, 22, 23, 4], [2, 3, 24, 19, 9, 20, 20, 4]])
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(zaya_jax.forward(params, config, ids))
    assert np.abs(got - want).max() <= 1e-4


def test_demo_command(capsys):
    assert main(["demo", "--problems", "3", "--population", "4", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    methods = [r["method"] for r in out["rows"]]
    assert methods[0] == "single sample" and methods[1].startswith("majority vote")
    assert methods[2].startswith("Markov RSA round 1")
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in out["rows"])
    assert out["problems"] == 3 and out["rounds"] == 1
    tokens = [r["tokens"] for r in out["rows"][1:]]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_demo_table(capsys):
    assert main(["demo", "--problems", "2", "--population", "4", "--rounds", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index("-" * 65) + 1:]
    assert [line.split("  ")[0] for line in table[:4]] == [
        "single sample", "majority vote (N=4)", "Markov RSA round 1 (N=4, C=4)", "Markov RSA round 1 + majority vote"]
    single, rsa = (float(table[i].split()[-2].rstrip("%")) for i in (0, 2))
    assert table[4] == f"Markov RSA after round 1 vs a single sample: {rsa - single:+.1f} points"
    assert table[5].startswith("2 held-out problems")
