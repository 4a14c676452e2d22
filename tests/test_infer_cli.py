"""`zaya generate`: the shipped demo model by default, text and chat with a tokenizer, JSONL batches, errors."""

import fcntl
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import hf_ref
import tokenizer_ref
from zaya_jax import load
from zaya_jax.cli import main
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.infer import generate
from zaya_jax.infer.tokenizer import Tokenizer


def run(capsys, *argv):
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def default_tokens():
    config, params = load(DEFAULT_MODEL_DIR)
    return generate(params, config, [[2, 10, 20, 30]], max_new_tokens=8).tokens[0]


def test_prompt_ids_on_the_default_model(capsys, default_tokens):
    code, out, _ = run(capsys, "--prompt-ids", "2,10,20,30", "--max-new-tokens", "8", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["prompt_ids"] == [2, 10, 20, 30] and result["tokens"] == default_tokens
    assert result["stop_reason"] in ("max_new_tokens", "stop_token")
    assert result["text"] == Tokenizer.from_dir(DEFAULT_MODEL_DIR).decode(default_tokens, skip_special_tokens=True)
    # Without --json the text streams to stdout and the stop reason goes to stderr.
    code, out, err = run(capsys, "--prompt-ids", "2,10,20,30", "--max-new-tokens", "8")
    assert code == 0 and out == result["text"] + "\n" and result["stop_reason"] in err


@pytest.mark.parametrize("argv, message", [
    (["--prompt-ids", "1,2,5000"], r"token id\(s\) \[5000\] outside the vocabulary \[0, 101\)"),
    (["--prompt-ids", ",".join(["5"] * 1024)], "1024 tokens; the maximum length .* is 1024"),
    (["--prompt-ids", "1", "--top-p", "0"], "top_p must be in"),
])
def test_errors_on_the_default_model(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert re.search(message, err), err


def test_text_prompts_on_the_default_model_are_chats(capsys):
    tokenizer = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    user = [{"role": "user", "content": "47+85+26"}]
    for flags, ids in (((), tokenizer.encode_chat(user, add_generation_prompt=True)),
                       (("--no-chat",), tokenizer.encode("47+85+26"))):
        code, out, _ = run(capsys, "--prompt", "47+85+26", "--max-new-tokens", "40", "--json", *flags)
        assert code == 0 and json.loads(out)["prompt_ids"] == ids
    assert json.loads(out)["prompt_ids"] != tokenizer.encode_chat(user, add_generation_prompt=True)
    code, out, _ = run(capsys, "--prompt", "47+85+26", "--max-new-tokens", "40", "--json")
    assert json.loads(out)["text"].endswith("\\boxed{158}")  # the model was trained on chats

def test_empty_prompts_are_refused(capsys):
    code, _, err = run(capsys, "--prompt-ids", ",")
    assert code == 2 and "--prompt-ids is empty" in err
    code, _, err = run(capsys, "--prompt", "  ")
    assert code == 2 and "--prompt is empty" in err


@pytest.mark.parametrize("command", ["generate", "rsa", "eval", "demo", "train", "rl"])
def test_a_seed_beyond_64_bits_is_refused_by_name(capsys, command):
    """It once reached jax.random.key and ended in an OverflowError traceback."""
    with pytest.raises(SystemExit) as info:
        main([command, "--seed", str(2 ** 63)])
    assert info.value.code == 2
    assert f"argument --seed: must be a signed 64-bit integer, got {2 ** 63}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["forward", "--top", "0"], "argument --top: must be >= 1, got 0"),
    (["export", "a", "b", "--max-shard-size", "inf"], "argument --max-shard-size: must be finite and > 0, got inf"),
    (["export", "a", "b", "--max-shard-size", "0"], "argument --max-shard-size: must be finite and > 0, got 0"),
    (["serve", "--port", "70000"], "argument --port: must be >= 0 and <= 65535, got 70000"),  # bound 70000 - 65536
    (["serve", "--max-body-bytes", "0"], "argument --max-body-bytes: must be >= 1, got 0"),
    (["train", "--grad-accum", "0"], "argument --grad-accum: must be >= 1, got 0"),  # was a ZeroDivisionError
    (["forward", "--top", "x"], "argument --top: must be an integer, got 'x'"),
])
def test_numbers_out_of_range_are_refused_by_name(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    hf_ref.build(dict(hf_ref.CONFIGS["tiny"], tie_word_embeddings=False), path, seed=2)
    tokenizer_ref.write(path)
    return path


def test_text_and_chat_prompts(capsys, model_dir):
    tok = Tokenizer.from_dir(model_dir)
    code, out, _ = run(capsys, str(model_dir), "--prompt", "hello there", "--chat", "--no-thinking",
                       "--max-new-tokens", "6", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["prompt_ids"] == tok.encode_chat([{"role": "user", "content": "hello there"}], enable_thinking=False)
    assert result["text"] == tok.decode(result["tokens"], skip_special_tokens=True)
    # Streaming prints the same text.
    code, out, _ = run(capsys, str(model_dir), "--prompt", "hello there", "--chat", "--no-thinking",
                       "--max-new-tokens", "6")
    assert code == 0 and out == result["text"] + "\n"


def test_prompts_file_jsonl(capsys, model_dir, tmp_path):
    tok = Tokenizer.from_dir(model_dir)
    lines = [
        {"prompt": "the quick brown fox"},
        {"prompt_ids": [2, 40, 41], "max_new_tokens": 3},
        {"messages": [{"role": "user", "content": "what is two plus two?"}], "temperature": 0.7, "top_k": 5},
    ]
    file = tmp_path / "prompts.jsonl"
    file.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    code, out, _ = run(capsys, str(model_dir), "--prompts-file", str(file), "--max-new-tokens", "5", "--seed", "3")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    prompts = [tok.encode("the quick brown fox"), [2, 40, 41],
                      tok.encode_chat(lines[2]["messages"])]
    config, params = load(model_dir)
    ref = generate(params, config, prompts, max_new_tokens=[5, 3, 5], temperature=[0.0, 0.0, 0.7],
                   top_k=[0, 0, 5], seed=3)
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert [r["tokens"] for r in rows] == ref.tokens
    assert [r["stop_reason"] for r in rows] == ref.stop_reasons
    assert rows[0]["text"] == tok.decode(ref.tokens[0], skip_special_tokens=True)


def test_prompts_file_bad_lines_get_error_records(capsys, model_dir, tmp_path):
    """A bad line gets a record naming its file line; the other lines still run; the exit code says so."""
    file = tmp_path / "bad.jsonl"
    bad = [
        ("not json", r"bad.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "prompt_ids": [1]}', r"bad.jsonl:3: each line must be an object with exactly one of"),
        ('{"prompt_ids": [1], "temp": 1}', r"bad.jsonl:4: unknown key\(s\) \['temp'\]"),
        ('{"prompt": 42}', r"bad.jsonl:5: \"prompt\" must be a non-empty string"),
        ('{"prompt_ids": [1, 99999]}', r"bad.jsonl:6: prompt has token id\(s\) \[99999\] outside the vocabulary"),
        ('{"prompt_ids": []}', r"bad.jsonl:7: prompt is empty"),
        ('{"prompt_ids": [1], "top_p": 0}', r"bad.jsonl:8: top_p must be in"),
        ('{"prompt_ids": [1], "max_new_tokens": 0}', r"max_new_tokens must be an integer >= 1"),
        ('{"prompt_ids": %s}' % json.dumps([3] * 600), r"bad.jsonl:10: prompt has 600 tokens; the maximum length"),
    ]
    file.write_text("\n".join(['{"prompt_ids": [2, 40, 41]}'] + [b for b, _ in bad] + ['{"prompt_ids": [5]}']) + "\n")
    code, out, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--max-new-tokens", "3",
                         "--max-len", "512")
    assert code == 2 and "9 line(s) with errors" in err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in rows] == list(range(1, 12))
    for row, (_, message) in zip(rows[1:-1], bad):
        assert re.search(message, row["error"]), row["error"]
    config, params = load(model_dir)
    ref = generate(params, config, [[2, 40, 41], [5]], max_new_tokens=3)
    assert [rows[0]["tokens"], rows[-1]["tokens"]] == ref.tokens
    file.write_text("\n\n")
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file))
    assert code == 2 and "holds no prompts" in err


def test_prompts_file_out_is_never_overwritten(capsys, model_dir, tmp_path):
    file, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    file.write_text('{"prompt_ids": [2, 40]}\n')
    out.write_text("my notes\n")
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out))
    assert code == 2 and "--resume continues it, --force replaces it" in err and out.read_text() == "my notes\n"
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--resume")
    assert code == 2 and "not a record of zaya generate" in err and out.read_text() == "my notes\n"
    out.write_text("my notes, no newline")  # not a record cut by a kill: resuming must not cut it away
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--resume")
    assert code == 2 and "neither a whole record nor the start of one" in err
    assert out.read_text() == "my notes, no newline"
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--force", "--slots", "0")
    assert code == 2 and "slots must be a positive integer" in err  # refused before --force replaced anything
    assert out.read_text() == "my notes, no newline"
    assert run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--force")[0] == 0
    record = json.loads(out.read_text())
    assert record["line"] == 1
    # --resume continues only the same run: another prompts file, or other settings, is refused.
    other = tmp_path / "other.jsonl"
    other.write_text('{"prompt_ids": [2, 41]}\n')
    for argv in (["--prompts-file", str(other)], ["--prompts-file", str(file), "--seed", "1"],
                 ["--prompts-file", str(file), "--max-new-tokens", "3"]):
        code, _, err = run(capsys, str(model_dir), *argv, "--out", str(out), "--resume")
        assert code == 2 and f"comes from another run (run {record['run']}" in err, err
    assert json.loads(out.read_text()) == record
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--resume")
    assert code == 0 and "1 already in" in err and json.loads(out.read_text()) == record
    # One writer per output: a run holding --out's lock refuses a second; a record written twice is refused.
    with open(out) as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        for flag in ("--resume", "--force"):
            code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), flag)
            assert code == 2 and f"--out {out} is being written by another run" in err, err
    assert json.loads(out.read_text()) == record
    out.write_text(2 * (json.dumps(record) + "\n"))
    code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--out", str(out), "--resume")
    assert code == 2 and f"{out}:2 is a second record of line 1" in err


@pytest.mark.parametrize("alias", ["itself", "symlink", "hard link", "through a symlinked folder"])
def test_the_prompts_file_is_never_the_out_file(capsys, tmp_path, alias):
    """Under any flag, --out naming the prompts file (as itself, a symlink, a hard link) is refused; the file stays."""
    prompts, text = tmp_path / "p.jsonl", '{"prompt_ids": [2, 10, 20]}\n'
    prompts.write_text(text)
    out = tmp_path / "out.jsonl"
    if alias == "itself":
        out = prompts
    elif alias == "symlink":
        out.symlink_to(prompts)
    elif alias == "hard link":
        out.hardlink_to(prompts)
    else:
        (tmp_path / "via").symlink_to(tmp_path)
        out = tmp_path / "via" / "p.jsonl"
    for flags in ([], ["--force"], ["--resume"]):
        code, _, err = run(capsys, "--prompts-file", str(prompts), "--out", str(out), *flags)
        assert code == 2 and f"--out {out} is the same file as --prompts-file {prompts}" in err, err
        assert "inputs are never outputs" in err and prompts.read_text() == text


def test_model_without_tokenizer_refuses_text(capsys, tmp_path):
    hf_ref.build("tiny", tmp_path, seed=0)
    code, _, err = run(capsys, str(tmp_path), "--prompt", "hello")
    assert code == 2 and "has no tokenizer.json" in err and "--prompt-ids" in err


def test_resume_after_sigkill_gives_the_same_file(model_dir, tmp_path):
    """`zaya generate --out` killed with SIGKILL mid-run (possibly mid-line), then --resume: the file equals an
    uninterrupted run's, byte for byte (records in line order; each line's tokens depend on it alone)."""
    rng = np.random.default_rng(0)
    file = tmp_path / "p.jsonl"
    file.write_text("".join(json.dumps({"prompt_ids": rng.integers(1, 200, rng.integers(1, 30)).tolist(),
                                        "temperature": float(rng.choice([0.0, 1.0]))}) + "\n" for _ in range(48)))
    argv = [sys.executable, "-m", "zaya_jax.cli", "generate", str(model_dir), "--prompts-file", str(file),
            "--max-new-tokens", "24", "--slots", "2", "--decode-steps", "1", "--seed", "5", "--no-progress"]
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    first = subprocess.run(argv + ["--out", str(whole)], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    proc = subprocess.Popen(argv + ["--out", str(part)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if part.exists() and part.read_bytes().count(b"\n") >= 6:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert 6 <= part.read_bytes().count(b"\n") < 48
    resumed = subprocess.run(argv + ["--out", str(part), "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert part.read_bytes() == whole.read_bytes()


def test_prompts_file_of_shared_prefixes_reports_its_prefix_hits(capsys, model_dir, tmp_path):
    header = list(range(3, 43))  # 40 tokens: two whole 16-token blocks
    file = tmp_path / "shared.jsonl"
    file.write_text("".join(json.dumps({"prompt_ids": header + [50 + i]}) + "\n" for i in range(3)))
    code, out, err = run(capsys, str(model_dir), "--prompts-file", str(file), "--max-new-tokens", "2", "--slots", "1",
                         "--no-progress")
    assert code == 0 and len(out.splitlines()) == 3
    # One slot: the first prompt prefills whole, the other two start from its cached block (the default prefix
    # cache, a quarter of 1 slot x 64 tokens, holds one 16-token block).
    assert "prefix cache: 2 hit(s), 32 of 123 prompt tokens served from it; 91 prefilled" in err
