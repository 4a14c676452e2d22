"""Training data: records -> examples with loss masks (chat: assistant turns only), batches, data state."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from zaya_jax.infer.tokenizer import Tokenizer
from zaya_jax.train import data

SPECIALS = ["<pad>", "<bos>", "<eos>", "<turn>", "<end>"]
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<turn>{{ m['role'] }}\n{{ m['content'] }}<end>\n{% endfor %}"
            "{% if add_generation_prompt %}<turn>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A byte-level tokenizer (one token per byte) with special tokens, BOS added by its post-processor,
    and a chat template, written as a model directory would hold it."""
    path = tmp_path_factory.mktemp("tok")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(alphabet))}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "chat_template": TEMPLATE}))
    return Tokenizer.from_dir(path)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."}]


def test_chat_loss_mask_covers_assistant_turns_only(tokenizer):
    ex = data.chat_example(CHAT, tokenizer)
    full = tokenizer.render_chat(CHAT, add_generation_prompt=False)
    assert tokenizer.decode(ex.ids) == full
    # Targets, read back in order: each assistant turn as the template writes it, end marker included.
    spans = np.split(ex.ids, np.flatnonzero(np.diff(ex.loss_mask)) + 1)
    runs, start = [], 0
    for s in spans:
        if ex.loss_mask[start]:
            runs.append(tokenizer.decode(s))
        start += s.size
    assert runs == ["Hello.<end>\n", "Bye.<end>\n"]
    # The prompt of the first turn tokenizes exactly as it does at inference.
    prompt = tokenizer.encode_chat(CHAT[:2], add_generation_prompt=True)
    assert list(ex.ids[: len(prompt)]) == prompt and not ex.loss_mask[: len(prompt)].any()
    assert ex.ids[0] == tokenizer.token_id("bos_token")  # once, from the template


def test_text_and_pretokenized_records(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "abc"},
        {"input_ids": [1, 5, 6, 7], "loss_mask": [0, 0, 1, 1]},
        {"input_ids": [1, 5, 6]},
        {"messages": CHAT[1:3]},
    ])
    examples, report = data.load_examples(path, seq_len=64, vocab_size=300, tokenizer=tokenizer, eos=2)
    assert report == data.LoadReport(examples=4, truncated=0, dropped=0)
    text = examples[0]
    assert list(text.ids) == [1] + tokenizer.encode("abc", add_special_tokens=False) + [2] and text.loss_mask.all()
    assert list(examples[1].loss_mask) == [0, 0, 1, 1]
    assert list(examples[2].loss_mask) == [1, 1, 1]


def test_truncation_and_dropping(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"input_ids": list(range(1, 11))},
        {"input_ids": [1, 2, 3, 4, 5, 6], "loss_mask": [0, 0, 0, 0, 1, 1]},  # targets beyond seq_len
        {"input_ids": [1, 2]},
    ])
    examples, report = data.load_examples(path, seq_len=4, vocab_size=16)
    assert report == data.LoadReport(examples=2, truncated=2, dropped=1)
    assert [list(e.ids) for e in examples] == [[1, 2, 3, 4], [1, 2]]


@pytest.mark.parametrize("record, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ("[1, 2]", "d.jsonl:2: expected a JSON object"),
    ({"prompt": "x"}, "d.jsonl:2: a record needs exactly one of"),
    ({"text": "x", "input_ids": [1]}, "d.jsonl:2: a record needs exactly one of"),
    ({"input_ids": [1, 999]}, "d.jsonl:2: token id 999 outside the vocabulary"),
    ({"input_ids": [1, 2], "loss_mask": [1]}, "d.jsonl:2: 'loss_mask' must be"),
    ({"input_ids": ["a"]}, "d.jsonl:2: 'input_ids' must be a list of integers"),
    ({"text": "hello"}, "d.jsonl:2: 'text' records need a tokenizer"),
])
def test_bad_records_name_the_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"input_ids": [1, 2]}, record])
    with pytest.raises(data.DataError, match=message):
        data.load_examples(path, seq_len=8, vocab_size=16)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "x"}], "no assistant message"),
    ([{"role": "assistant", "content": "x"}], "starts with an assistant message"),
    ([{"role": "user"}, {"role": "assistant", "content": "x"}], "message 0 must be an object"),
    ([{"role": "user", "content": "x"}, {"role": "Assistant", "content": "y"}, {"role": "assistant", "content": "z"}],
     "message 1 has role 'Assistant'; roles are system, developer, user, assistant"),  # once trained on nothing
])
def test_bad_chats(tokenizer, tmp_path, messages, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    with pytest.raises(data.DataError, match="d.jsonl:1: .*" + message):
        data.load_examples(path, seq_len=64, vocab_size=300, tokenizer=tokenizer)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.load_examples(str(tmp_path / "none.jsonl"), seq_len=8, vocab_size=16)
    with pytest.raises(data.DataError, match="holds no records"):
        data.load_examples(write_jsonl(tmp_path / "e.jsonl", ["", " "]), seq_len=8, vocab_size=16)


def make_examples(n):
    return [data.Example(np.arange(1, 2 + i % 5, dtype=np.int32), np.ones(1 + i % 5, np.int32)) for i in range(n)]


def test_batches_shuffle_each_epoch_and_resume_exactly():
    examples = make_examples(10)
    stream = data.Batches(examples, batch_size=4, seq_len=8, seed=3)
    # Every example exactly once per epoch (5 batches = 2 epochs), in a different order each epoch.
    rows = np.concatenate([next(stream)["tokens"] for _ in range(5)])
    keys = [tuple(r) for r in rows]
    assert sorted(keys[:10]) == sorted(keys[10:]) == sorted(tuple(data.pad_batch([e], 8)["tokens"][0]) for e in examples)
    # Resume: a fresh stream restored to a saved position yields the same batches.
    stream = data.Batches(examples, batch_size=4, seq_len=8, seed=3)
    next(stream), next(stream)
    saved = stream.state()
    expected = [next(stream) for _ in range(3)]
    resumed = data.Batches(examples, batch_size=4, seq_len=8, seed=3)
    resumed.restore(saved)
    for a, b in zip(expected, (next(resumed) for _ in range(3))):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    with pytest.raises(ValueError, match="seed"):
        data.Batches(examples, batch_size=4, seq_len=8, seed=4).restore(saved)


def test_pad_batch_is_right_padded():
    batch = data.pad_batch([data.Example(np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.int32))], 5, pad_id=9)
    np.testing.assert_array_equal(batch["tokens"], [[5, 6, 7, 9, 9]])
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["loss_mask"], [[0, 1, 1, 0, 0]])
