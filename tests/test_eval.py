"""`zaya eval`: dataset lines, math-verify grading through scoring, the run directory, resume, the demo."""

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest

from zaya_jax.cli import main
from zaya_jax.demo import DEFAULT_MODEL_DIR, arith
from zaya_jax.infer.eval_output import RunDir
from zaya_jax.infer.evaluate import Grader, Problem, apply_prompt_template, read_dataset, score_problem, summarize
from zaya_jax.infer.rsa import RSAResult, RSARound, extract_boxed
from zaya_jax.infer.tokenizer import Tokenizer

TINY = ["--population", "4", "--rounds", "1"]  # the demo's C=4, budget 64, tau 24; small N and T


def _result(texts_per_round, tokenizer):
    """A one-problem RSAResult whose round t members wrote ``texts_per_round[t]``."""
    rounds = [RSARound(candidates=[[tokenizer.encode(t, add_special_tokens=False) for t in texts]],
                       stop_reasons=[["stop_token"] * len(texts)], tails=[[[] for _ in texts]], subsets=None,
                       prompts=[[[1] for _ in texts]], generated_tokens=sum(len(t) for t in texts), seconds=0.5)
              for texts in texts_per_round]
    return RSAResult(rounds=rounds, answers=[[None]], majority=[(None, 0.0)], texts=None)


def test_math_verify_grades_through_scoring_and_summary():
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    half = Problem(0, "half", "what is 1/2?", "0.5", 1)
    four = Problem(1, "four", "2+2", "4", 2)
    r_half = _result([["so \\boxed{\\frac{1}{2}}", "\\boxed{3}", "it is 0.5", "\\boxed{1/2}"],
                      ["\\boxed{0.5}", "\\boxed{\\frac12}", "\\boxed{2}", "\\boxed{1,000}"]], tokenizer)
    r_four = _result([["\\boxed{3}", "\\boxed{3}", "\\boxed{4}", "none"],
                      ["\\boxed{4}", "\\boxed{4.0}", "\\boxed{3}", "\\boxed{4}"]], tokenizer)
    math = Grader("math")
    rec = score_problem(half, r_half, math, tokenizer.decode)
    assert rec["rounds"][0]["answers"] == ["\\frac{1}{2}", "3", None, "1/2"]
    assert rec["rounds"][0]["correct"] == [True, False, False, True]  # 1/2 = 0.5; 3 != 0.5; no box is wrong
    assert rec["rounds"][0]["majority"] == "\\frac{1}{2}" and rec["rounds"][0]["majority_correct"]  # {\frac{1}{2}, 1/2}
    assert rec["rounds"][1]["correct"] == [True, True, False, False]
    rec4 = score_problem(four, r_four, math, tokenizer.decode)
    assert rec4["rounds"][0]["correct"] == [False, False, True, False]  # \boxed{3} against 4 is wrong
    assert rec4["rounds"][0]["majority"] == "3" and not rec4["rounds"][0]["majority_correct"]
    assert rec4["rounds"][1]["majority"] == "4" and rec4["rounds"][1]["majority_correct"]  # 4 and 4.0 cluster
    assert Grader("math").equal("1000", "1,000") and Grader("math").equal("[1,2)", "[1, 2)")
    assert Grader("math").equal("\\{1,2\\}", "\\{2,1\\}") and not Grader("math").equal("[1,2)", "(1,2]")

    in_thread = []  # the engine may hand problems over from another thread: math-verify's alarm is main-thread only
    worker = threading.Thread(target=lambda: in_thread.append(Grader("math").equal("0.25", "\\frac{1}{4}")))
    worker.start(), worker.join()
    assert in_thread == [True]

    settings = {"population": 4, "tails": 4}
    summary = summarize([rec4, rec], settings)  # order in: any; order used: the dataset's
    assert summary["pass@1"] == 3 / 8 and summary["majority@4"] == 0.5
    assert [r["mean_accuracy"] for r in summary["rounds"]] == [3 / 8, 5 / 8]
    assert [r["majority_accuracy"] for r in summary["rounds"]] == [0.5, 1.0]
    tokens0 = rec["rounds"][0]["tokens"] + rec4["rounds"][0]["tokens"]
    assert summary["rounds"][1]["tokens_so_far"] == rec["tokens"] + rec4["tokens"]
    assert [(r["method"], r["tokens"]) for r in summary["rows"]][:2] == [("single sample", tokens0 // 4),
                                                                         ("majority vote (N=4)", tokens0)]

    exact = Grader("exact")
    assert score_problem(half, r_half, exact, tokenizer.decode)["rounds"][0]["correct"] == [False] * 4
    assert score_problem(half, r_half, exact, tokenizer.decode)["rounds"][1]["correct"] == [True, False, False, False]


def test_dataset_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "1+1", "answer": 2}\n\n{"problem": "x", "answer": "\\\\frac{1}{2}", "id": "p"}\n'
                    '{"prompt": "y", "answer": "3"}\n{"question": "z", "answer": 11111111111111111112.0}\n')
    problems = read_dataset(str(path))
    assert [(p.index, p.id, p.question, p.answer, p.line) for p in problems] == [
        (0, "0", "1+1", "2", 1), (1, "p", "x", "\\frac{1}{2}", 3), (2, "2", "y", "3", 4),
        (3, "3", "z", "11111111111111111112.0", 5)]  # a number's digits as written, not a float's 17
    assert len(read_dataset(str(path), limit=2)) == 2
    assert apply_prompt_template("{question}\nPut the final answer in \\boxed{}.", "1+1") == \
        "1+1\nPut the final answer in \\boxed{}."
    with pytest.raises(ValueError, match="must contain {question}"):
        apply_prompt_template("Solve it.", "1+1")
    for body, message in [
        ('{"question": "a", "answer": "1"}\n{"answer": "2"}\n', ":2: no question"),
        ('{"question": "a", "answer": "1"}\n\n{"question": "b"}\n', ":3: no answer"),
        ('{"question": "a", "answer": ""}\n', ":1: no answer"),
        ('{"question": "  ", "answer": "1"}\n', ":1: no question"),
        ('{"question": "a", "answer": "1", "id": "x"}\n{"question": "b", "answer": "1", "id": "x"}\n',
         ":2: id 'x' is also the id of line 1"),
        ('{"question": "a", "answer": "1"}\n{"question": \n', ":2: not valid JSON"),
    ]:
        path.write_text(body)
        with pytest.raises(ValueError, match=message):
            read_dataset(str(path))


def test_dataset_with_a_byte_order_mark_and_ids_beside_positions(tmp_path):
    path = tmp_path / "bom.jsonl"
    lines = [{"question": "1+1", "answer": 2, "id": "1"}, {"question": "2+2", "answer": 4}, {"question": "3+3", "answer": 6}]
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(line) + "\n" for line in lines).encode())
    problems = read_dataset(str(path))
    # Line 2 has no id: its position, 1, is line 1's own id, so it is named "#1"; line 3 keeps its position.
    assert [p.id for p in problems] == ["1", "#1", "2"] and problems[0].question == "1+1"


def test_run_dir_drops_a_line_cut_by_a_kill_and_refuses_other_settings(tmp_path):
    out = str(tmp_path / "run")
    run = RunDir(out, {"seed": 0, "population": 4})
    run.append({"index": 0, "rounds": []})
    with open(os.path.join(out, "results.jsonl"), "a") as f:
        f.write('{"index": 1, "rou')  # killed mid-write
    run.close()
    again = RunDir(out, {"seed": 0, "population": 4}, resume=True)
    again.close()
    assert list(again.records) == [0]
    assert open(os.path.join(out, "results.jsonl")).read() == '{"index": 0, "rounds": []}\n'
    with pytest.raises(ValueError, match="other settings \\(seed: 0 there, 1 now\\)"):
        RunDir(out, {"seed": 1, "population": 4}, resume=True)
    with pytest.raises(ValueError, match="is not empty: pass --resume"):
        RunDir(out, {"seed": 0, "population": 4})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="has no run.json"):
        RunDir(str(tmp_path / "mine"), {}, resume=True)
    RunDir(str(tmp_path / "mine"), {"seed": 0}, force=True).close()
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"  # --force replaces only zaya eval's files
    # A resumed run reads only records of the shape zaya eval writes, and a run.json it can read.
    for line, where in (("{}", ":2:"), ("[1, 2]", ":2:"), ('{"index": 1}', ":2:"), ('{"index": "1", "rounds": []}', ":2:")):
        with open(os.path.join(out, "results.jsonl"), "w") as f:
            f.write('{"index": 0, "rounds": []}\n' + line + "\n")
        with pytest.raises(ValueError, match=f"results.jsonl{where} not a problem record of `zaya eval`"):
            RunDir(out, {"seed": 0, "population": 4}, resume=True)
    with open(os.path.join(out, "run.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="run.json is not valid JSON"):
        RunDir(out, {"seed": 0, "population": 4}, resume=True)


def test_one_run_writes_a_run_dir_at_a_time(tmp_path):
    """A second run on a directory a run holds is refused by name; --resume refuses a problem recorded twice."""
    out = str(tmp_path / "run")
    first = RunDir(out, {"seed": 0})
    first.append({"index": 0, "rounds": []})
    for flags in ({"resume": True}, {"force": True}):
        with pytest.raises(ValueError, match=f"--out {out} is being written by another run .*one writer per output"):
            RunDir(out, {"seed": 0}, **flags)
    first.append({"index": 0, "rounds": []})  # what a second, unlocked writer did
    first.close()
    with pytest.raises(ValueError, match=r"results.jsonl:2: a second record of problem 0"):
        RunDir(out, {"seed": 0}, resume=True)
    RunDir(out, {"seed": 0}, force=True).close()  # the lock went with the first run


@pytest.mark.parametrize("name", ["results.jsonl", "run.json", "summary.json", "summary.tmp.json", "accuracy.tmp.png"])
def test_run_dir_never_writes_over_its_data(tmp_path, name):
    out = tmp_path / "run"
    out.mkdir()
    data, text = out / name, '{"question": "1+1", "answer": "2"}\n'
    data.write_text(text)
    for flags in ({}, {"force": True}, {"resume": True}):
        with pytest.raises(ValueError, match=f"--out's {name} {out / name} is the same file as --data {data}: inputs "
                                             "are never outputs"):
            RunDir(str(out), {"seed": 0}, inputs={"--data": str(data)}, **flags)
        assert data.read_text() == text and os.listdir(out) == [name]


def test_eval_refuses_its_data_inside_out_under_a_name_it_writes(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    data = out / "results.jsonl"
    _write_heldout(data, 1)
    text = data.read_text()
    assert main(["eval", "--data", str(data), "--out", str(out), *TINY, "--force"]) == 2
    assert "is the same file as --data" in capsys.readouterr().err and data.read_text() == text


def _write_heldout(path, count):
    with open(path, "w") as f:
        for i, p in enumerate(arith.problems("test", count)):
            f.write(json.dumps({"id": f"test-{i}", "question": p.question, "answer": p.answer}) + "\n")


def test_eval_command_matches_demo_and_refuses(tmp_path, capsys):
    data, out = str(tmp_path / "heldout.jsonl"), str(tmp_path / "run")
    _write_heldout(data, 3)
    assert main(["eval", "--data", data, "--out", out, *TINY]) == 0
    records = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
    assert sorted(r["index"] for r in records) == [0, 1, 2]
    assert all(len(r["rounds"]) == 2 and len(r["rounds"][0]["correct"]) == 4 for r in records)
    summary_bytes = open(os.path.join(out, "summary.json"), "rb").read()
    summary = json.loads(summary_bytes)
    assert summary["problems"] == 3 and summary["settings"]["aggregation_template"] == "demo"
    assert "| single sample |" in open(os.path.join(out, "summary.md")).read()
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(out, "accuracy.png")) > 0
    except ImportError:
        assert "accuracy.png skipped" in capsys.readouterr().err
    capsys.readouterr()

    # The demo set through zaya eval gives zaya demo's table, seed for seed.
    texts_out = str(tmp_path / "demo")
    assert main(["demo", "--problems", "3", *TINY, "--json", "--out", texts_out, "--save-texts"]) == 0
    demo = json.loads(capsys.readouterr().out)
    assert demo["rows"] == summary["rows"] and demo["rounds"] == summary["rounds"]
    for record in map(json.loads, open(os.path.join(texts_out, "results.jsonl"))):  # the texts the answers came from
        assert [[extract_boxed(t) for t in r] for r in record["texts"]] == [r["answers"] for r in record["rounds"]]

    assert main(["eval", "--data", data, "--out", out, *TINY]) == 2
    assert "is not empty: pass --resume" in capsys.readouterr().err
    assert main(["eval", "--data", data, "--out", out, *TINY, "--seed", "1", "--resume"]) == 2
    assert "(seed: 0 there, 1 now)" in capsys.readouterr().err
    assert main(["eval", "--data", data, "--out", out, *TINY, "--resume"]) == 0  # nothing left to do
    assert open(os.path.join(out, "summary.json"), "rb").read() == summary_bytes


def test_eval_refuses_a_prompt_beyond_the_context(tmp_path, capsys):
    data, out = tmp_path / "long.jsonl", tmp_path / "run"
    data.write_text(json.dumps({"question": "1+2", "answer": "3"}) + "\n"
                    + json.dumps({"question": "1" * 990, "answer": "1"}) + "\n")
    assert main(["eval", "--data", str(data), "--out", str(out), *TINY]) == 2
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    prompt = len(tokenizer.encode_chat([{"role": "user", "content": "1" * 990}]))
    err = capsys.readouterr().err
    assert f"long.jsonl:2: round 0's prompt is {prompt} tokens; with 64 new tokens that is {prompt + 64 - 1024} more" in err
    assert not out.exists()  # refused before anything was written


def test_eval_refuses_a_huge_question_by_its_length_before_tokenizing(tmp_path, capsys):
    """Refused by its length alone (the message says so): tokenizing it would take gigabytes."""
    data, out = tmp_path / "huge.jsonl", tmp_path / "run"
    data.write_text(json.dumps({"question": "1+2", "answer": "3"}) + "\n"
                    + json.dumps({"question": "1" * 6_000_000, "answer": "1"}) + "\n")
    longest = Tokenizer.from_dir(DEFAULT_MODEL_DIR).longest_token
    assert main(["eval", "--data", str(data), "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert (f"huge.jsonl:2: the text has 6,000,000 characters: at least {-(-6_000_000 // longest):,} tokens (no token "
            f"spells more than {longest} characters), more than the 1,024 that fit") in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--population", "0"], "population must be a positive integer"),
    (["--tails", "5"], r"tails \(5\) cannot exceed population \(4\)"),
    (["--final-budget", "0"], "final_budget must be a positive integer, got 0"),
    (["--temperature", "nan"], "temperature must be finite"),
    (["--top-p", "1.5"], r"top_p must be in \(0, 1\]"),
    (["--slots", "0"], "--slots must be a positive integer"),
])
def test_eval_refuses_bad_settings_before_writing(tmp_path, capsys, flags, message):
    """A refused run leaves no run directory behind (one would block the corrected run without --force)."""
    data, out = tmp_path / "heldout.jsonl", tmp_path / "run"
    _write_heldout(data, 1)
    assert main(["eval", "--data", str(data), "--out", str(out), *TINY, *flags]) == 2
    assert re.search(message, capsys.readouterr().err) and not out.exists()


_KILL_AFTER_ONE = """
import os, signal, sys
from zaya_jax.cli import main
from zaya_jax.infer.eval_output import RunDir
append = RunDir.append
def append_then_die(self, record):
    append(self, record)
    if len(self.records) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
RunDir.append = append_then_die
sys.exit(main(sys.argv[1:]))
"""


def test_resume_after_kill_gives_the_same_summary(tmp_path):
    data = str(tmp_path / "heldout.jsonl")
    _write_heldout(data, 3)  # the uninterrupted run has the shapes of the test above: compiled once
    whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
    args = ["eval", "--data", data, *TINY]
    proc = subprocess.run([sys.executable, "-c", _KILL_AFTER_ONE, *args, "--out", killed], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert len(open(os.path.join(killed, "results.jsonl")).readlines()) == 1
    assert not os.path.exists(os.path.join(killed, "summary.json"))
    assert main([*args, "--out", killed, "--resume"]) == 0
    assert main([*args, "--out", whole]) == 0
    assert len(open(os.path.join(killed, "results.jsonl")).readlines()) == 3
    assert open(os.path.join(killed, "summary.json"), "rb").read() == open(os.path.join(whole, "summary.json"), "rb").read()


def test_aggregation_template_follows_the_demo_model_or_mode(tmp_path):
    """A model trained from the demo model (zaya rl's output) aggregates with the demo template under
    --mode demo; any other model with the default one."""
    from zaya_jax.infer.rsa_modes import mode_template, template_kind

    kind = mode_template
    assert kind(DEFAULT_MODEL_DIR, None) == "demo" and kind(DEFAULT_MODEL_DIR, "light") == "demo"
    assert kind(str(tmp_path / "rl" / "model"), "demo") == "demo"
    assert kind(str(tmp_path / "rl" / "model"), None) == "default" and kind(str(tmp_path), "light") == "default"
    assert template_kind(str(tmp_path), "demo") == "demo" and template_kind(None) == "demo"  # zaya rl's choice
