"""The demo model's character-level tokenizer (built with ``tokenizers``) and Gemma-style chat template."""

from __future__ import annotations

import json

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

PAD, EOS, BOS, START_TURN, END_TURN = "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"
SPECIALS = (PAD, EOS, BOS, START_TURN, END_TURN)
# Printable ASCII: covers the task, the chat template and any aggregation template text.
CHARACTERS = "\n" + "".join(chr(c) for c in range(32, 127))
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<start_of_turn>{{ role }}\n{{ message['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """One token per character; the special tokens first (pad 0, eos 1, bos 2, turns 3 and 4)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tokenizer_config() -> dict:
    return {
        "bos_token": BOS, "eos_token": END_TURN, "pad_token": PAD, "unk_token": PAD,
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 1024,
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE,
    }


def write(directory: str) -> None:
    """Writes tokenizer.json, tokenizer_config.json and chat_template.jinja into ``directory``."""
    import os

    build_tokenizer().save(os.path.join(directory, "tokenizer.json"))
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config(), f, indent=1)
    with open(os.path.join(directory, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
