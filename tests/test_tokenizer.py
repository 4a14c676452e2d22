"""Tokenizer and chat template: the same text and ids as transformers' tokenizer on a local tokenizer."""

import json

import pytest
import transformers

import tokenizer_ref
from zaya_jax.infer.tokenizer import Tokenizer, TokenizerError

MESSAGES = [
    {"role": "system", "content": "a model answers questions."},
    {"role": "user", "content": "  what is two plus two?  "},
    {"role": "assistant", "content": "four.", "reasoning_content": "two plus two"},
    {"role": "user", "content": "hello there", "name": None},
]


@pytest.fixture(scope="module", params=["chat_template.jinja", "tokenizer_config.json"])
def tokenizers_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tokenizer_ref.write(path, template_file=request.param == "chat_template.jinja")
    return Tokenizer.from_dir(path), transformers.AutoTokenizer.from_pretrained(path)


def test_encode_decode_match_transformers(tokenizers_pair):
    ours, hf = tokenizers_pair
    for text in tokenizer_ref.CORPUS + ["unseen words: zebra!", ""]:
        assert ours.encode(text) == hf(text)["input_ids"]
        assert ours.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
        ids = ours.encode(text)
        assert ours.decode(ids) == hf.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert ours.encode("hello")[0] == ours.token_id("bos_token") == hf.bos_token_id
    assert ours.token_id("eos_token") == hf.eos_token_id == ours.tokenizer.token_to_id("<end_of_turn>")


@pytest.mark.parametrize("kwargs", [
    dict(add_generation_prompt=True),
    dict(add_generation_prompt=True, enable_thinking=False),
    dict(add_generation_prompt=True, enable_thinking=True),
    dict(add_generation_prompt=False),
    dict(add_generation_prompt=True, tools=[{"name": "add", "parameters": {"a": "<int>"}}]),
])
def test_chat_template_matches_apply_chat_template(tokenizers_pair, kwargs):
    ours, hf = tokenizers_pair
    text = ours.render_chat(MESSAGES, **kwargs)
    assert text == hf.apply_chat_template(MESSAGES, tokenize=False, **kwargs)
    ids = hf.apply_chat_template(MESSAGES, tokenize=True, return_dict=False, **kwargs)
    assert ours.encode_chat(MESSAGES, **kwargs) == list(ids)


def test_thinking_toggle_changes_the_prompt(tokenizers_pair):
    ours, _ = tokenizers_pair
    off = ours.render_chat(MESSAGES, enable_thinking=False)
    on = ours.render_chat(MESSAGES, enable_thinking=True)
    assert off.endswith("<start_of_turn>model\n<think>\n\n</think>\n\n") and on.endswith("<start_of_turn>model\n")
    assert '"a": "<int>"' in ours.render_chat(MESSAGES, tools=[{"a": "<int>"}])  # tojson does not escape HTML


def test_template_errors_are_reported(tokenizers_pair, tmp_path):
    ours, _ = tokenizers_pair
    with pytest.raises(Exception, match="unknown role robot"):
        ours.render_chat([{"role": "robot", "content": "beep"}])
    with pytest.raises(TokenizerError, match="messages must be"):
        ours.render_chat([])
    with pytest.raises(TokenizerError, match="has no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    tokenizer_ref.write(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).render_chat(MESSAGES)
    config["chat_template"] = [{"name": "tool_use", "template": "x"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="none is 'default'"):
        Tokenizer.from_dir(tmp_path)
    config["chat_template"] = [{"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_dir(tmp_path).render_chat([{"role": "user", "content": "hi"}]) == "hi!"


def test_a_lone_surrogate_is_refused_by_name():
    from zaya_jax.demo import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    for encode in (lambda text: tok.encode(text), lambda text: tok.encode_chat([{"role": "user", "content": text}])):
        with pytest.raises(TokenizerError, match=r"lone surrogate '\\ud800' \(character \d+\), which is not a character"):
            encode("1+\ud800")


def test_text_too_long_for_max_tokens_is_refused_by_its_length():
    from zaya_jax.demo import DEFAULT_MODEL_DIR

    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    assert tok.longest_token == len("<start_of_turn>")  # the demo's vocabulary: characters and its control tokens
    assert tok.encode("1" * 15 * 4, max_tokens=4) == tok.encode("1" * 60)  # might fit: tokenized
    with pytest.raises(TokenizerError, match="the text has 61 characters: at least 5 tokens .* more than the 4 that fit"):
        tok.encode("1" * 61, max_tokens=4)
