"""`zaya generate`: the shipped demo model by default, text and chat with a tokenizer, JSONL batches, errors."""

import json
import re

import pytest

import hf_ref
import tokenizer_ref
from zaya_jax import load
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.cli import main
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
    with pytest.raises(SystemExit, match="--prompt-ids is empty"):
        main(["generate", "--prompt-ids", ","])
    code, _, err = run(capsys, "--prompt", "  ")
    assert code == 2 and "--prompt is empty" in err


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
    assert [r["index"] for r in rows] == [0, 1, 2]
    assert [r["tokens"] for r in rows] == ref.tokens
    assert [r["stop_reason"] for r in rows] == ref.stop_reasons
    assert rows[0]["text"] == tok.decode(ref.tokens[0], skip_special_tokens=True)


def test_prompts_file_errors(capsys, model_dir, tmp_path):
    file = tmp_path / "bad.jsonl"
    for content, message in [
        ('{"prompt": "a"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "prompt_ids": [1]}\n', "exactly one of prompt, prompt_ids, messages"),
        ('{"prompt_ids": [1], "temp": 1}\n', r"unknown key\(s\) \['temp'\]"),
        ("\n", "holds no prompts"),
    ]:
        file.write_text(content)
        code, _, err = run(capsys, str(model_dir), "--prompts-file", str(file))
        assert code == 2 and re.search(message, err), err


def test_model_without_tokenizer_refuses_text(capsys, tmp_path):
    hf_ref.build("tiny", tmp_path, seed=0)
    code, _, err = run(capsys, str(tmp_path), "--prompt", "hello")
    assert code == 2 and "has no tokenizer.json" in err and "--prompt-ids" in err
