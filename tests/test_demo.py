"""The demo: task generator, training data, the shipped model (vs transformers) and `zaya demo`."""

import json
import pathlib
import random
import re

import numpy as np
import pytest
import torch
import transformers

import zaya_jax
from zaya_jax.cli import main
from zaya_jax.demo import DEFAULT_MODEL_DIR, arith, build, data
from zaya_jax.infer.rsa import extract_boxed
from zaya_jax.infer.tokenizer import Tokenizer


def test_problems_are_fixed_and_splits_disjoint():
    assert arith.problems("test", 5) == arith.problems("test", 5)
    train = {arith.problem("train", i).terms for i in range(2000)}
    test = [arith.problem("test", i).terms for i in range(200)]
    assert not any(t in train for t in test)  # disjoint by construction
    assert all(arith.held_out(t) for t in test) and not any(arith.held_out(t) for t in train)
    for p in arith.problems("test", 50):
        assert arith.MIN_TERMS <= len(p.terms) <= arith.MAX_TERMS
        assert extract_boxed(p.solution()) == str(sum(p.terms)) == p.answer
        assert len(p.solution()) < data.BUDGET  # one token per character, plus the stop token
        lines = p.solution().split("\n")[:-1]
        assert all(eval(line.split("=")[0]) == int(line.split("=")[1]) for line in lines)  # noqa: S307


def test_corrupted_solutions_end_wrong():
    rng = random.Random(0)
    for p in arith.problems("train", 50):
        wrong = p.solution(rng.randrange(len(p.terms) - 1), rng)
        assert extract_boxed(wrong) != p.answer


@pytest.mark.parametrize("target, lines", [("final_step", 2), ("answer", 1)])
def test_aggregation_records_use_the_rsa_template(target, lines):
    rng = random.Random(1)
    p = arith.problem("train", 3)
    record = data.aggregate_record(p, rng, target=target)
    user, assistant = record["messages"]
    assert assistant["content"] == "\n".join(p.solution().split("\n")[-lines:])
    assert extract_boxed(assistant["content"]) == p.answer
    assert user["content"].startswith(data.TEMPLATE.intro + p.question + data.TEMPLATE.before_candidates)
    assert user["content"].count("#") == data.TAILS and user["content"].endswith(data.TEMPLATE.closing)
    with pytest.raises(ValueError, match="unknown aggregation target"):
        data.aggregate_record(p, rng, target="whole")


def test_training_stages_mix_solving_and_aggregation(tmp_path):
    for stage, share in ((1, 0.4), (2, 0.8)):
        path = tmp_path / f"stage{stage}.jsonl"
        data.write_training_data(str(path), 500, stage=stage, first_problem=1000 * stage)
        records = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
        aggregating = [m for m in records if m[0]["content"].startswith(data.TEMPLATE.intro)]
        assert len(aggregating) == share * 500
        targets = {m[1]["content"].count("\n") for m in aggregating}
        assert targets == {1 if stage == 1 else 0}  # final step + boxed answer, or the boxed answer alone
    with pytest.raises(ValueError, match="stage must be"):
        data.write_training_data(str(tmp_path / "x.jsonl"), 5, stage=3)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "x.jsonl.tmp").exists()


def test_training_examples_fit_the_documented_seq_len(tmp_path):
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    for stage in (1, 2):
        path = tmp_path / f"stage{stage}.jsonl"
        data.write_training_data(str(path), 3000, stage=stage)
        lengths = [len(tokenizer.encode_chat(json.loads(line)["messages"])) for line in path.read_text().splitlines()]
        assert len(lengths) == 3000 and max(lengths) <= build.SEQ_LEN  # else `zaya train` would truncate targets


def test_docs_give_the_commands_build_prints():
    text = (pathlib.Path(__file__).parents[1] / "docs" / "demo_model.md").read_text()
    text = re.sub(r" \\\n\s+", " ", text)  # join the shell line continuations
    for stage, data_file in ((1, "work/demo/train.jsonl"), (2, "work/demo/aggregate.jsonl")):
        assert f"--data {data_file} --out " in text and build.TRAIN_ARGS[stage] in text


def test_shipped_model_matches_transformers():
    config, params = zaya_jax.load(DEFAULT_MODEL_DIR)
    ref = transformers.ZayaForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32).eval()
    with torch.no_grad():  # from_pretrained resets the skip-route bias; put the stored values back
        for layer, biases in zip(ref.model.layers, np.array(params["layers"]["router"]["balancing_biases"])):
            layer.mlp.gate.balancing_biases.copy_(torch.as_tensor(biases))
    ids = np.array([[2, 3, 20, 21, 9, 22, 23, 4], [2, 3, 24, 19, 9, 20, 20, 4]])
    with torch.no_grad():
        want = ref(torch.as_tensor(ids)).logits.numpy()
    got = np.asarray(zaya_jax.forward(params, config, ids))
    assert np.abs(got - want).max() <= 1e-4


def test_demo_command(capsys):
    assert main(["demo", "--problems", "3", "--population", "4", "--rounds", "1", "--tail-tokens", "12", "--json"]) == 0
    captured = capsys.readouterr()
    assert "round 1/1 done" in captured.err  # the progress bar
    out = json.loads(captured.out)
    methods = [r["method"] for r in out["rows"]]
    assert methods == ["single sample", "majority vote (N=4)", "Markov RSA round 1 (N=4, C=4)",
                       "Markov RSA round 1 + majority vote"]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in out["rows"])
    assert out["problems"] == 3 and out["settings"]["rounds"] == 1 and out["settings"]["budget"] == data.BUDGET
    assert out["settings"]["tail_tokens"] == 12
    tokens = [r["tokens"] for r in out["rows"][1:]]
    assert tokens == sorted(tokens) and tokens[0] > 0


def test_demo_table(capsys):
    assert main(["demo", "--problems", "3", "--population", "4", "--rounds", "1", "--no-progress"]) == 0  # shapes above
    captured = capsys.readouterr()
    assert "round 1/1" not in captured.err
    lines = captured.out.splitlines()
    table = lines[lines.index("| --- | ---: | ---: |") + 1:]
    assert [line.split(" | ")[0] for line in table[:4]] == [
        "| single sample", "| majority vote (N=4)", "| Markov RSA round 1 (N=4, C=4)",
        "| Markov RSA round 1 + majority vote"]
    single, rsa = (float(table[i].split(" | ")[1].rstrip("%")) for i in (0, 2))
    assert table[4:6] == ["", f"Markov RSA after round 1 vs a single sample: {rsa - single:+.1f} points"]
    assert table[6].startswith("3 problems; this run solved 3 in ")
