"""A small tokenizer and Gemma-style chat template with a thinking toggle, built locally."""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<think>", "</think>"]
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello there, how can I help you today?",
    "what is two plus two? two plus two is four.",
    "a model answers questions; the user asks them.",
    "one line\ntwo lines\n\nthree.",
]
TEMPLATE = """{{ bos_token }}
{%- if tools %}<start_of_turn>system
Tools: {{ tools | tojson }}<end_of_turn>
{% endif %}
{%- for message in messages %}
{%- if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}
<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}
{{ message['content'] | trim }}<end_of_turn>
{% endfor %}
{%- if add_generation_prompt %}<start_of_turn>model
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% endif %}{% endif %}"""


def build(vocab_size: int = 200) -> tokenizers.Tokenizer:
    """A SentencePiece-style BPE (Metaspace) that prepends <bos>, like Gemma's."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    return tok


def write(path, *, template_file: bool = True, vocab_size: int = 200) -> tokenizers.Tokenizer:
    """Writes tokenizer.json, tokenizer_config.json and the template (as chat_template.jinja, or inside
    tokenizer_config.json when ``template_file`` is False) into ``path``."""
    tok = build(vocab_size)
    tok.save(os.path.join(path, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": {"__type": "AddedToken", "content": "<end_of_turn>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True},
        "pad_token": "<pad>",
        "unk_token": "<unk>",
    }
    if template_file:
        with open(os.path.join(path, "chat_template.jinja"), "w") as f:
            f.write(TEMPLATE)
    else:
        config["chat_template"] = TEMPLATE
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return tok
