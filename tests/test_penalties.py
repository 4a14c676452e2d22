"""Presence / frequency penalties and logit bias (OpenAI's formula, checked against numpy on forward's logits),
and grammar-constrained decoding on the engine (every output valid against its JSON schema)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zaya_jax
from zaya_jax.demo import DEFAULT_MODEL_DIR
from zaya_jax.infer import Engine, constraints
from zaya_jax.infer import penalties as pen
from zaya_jax.infer.tokenizer import Tokenizer

jsonschema = pytest.importorskip("jsonschema")

# A random model with a wide init, so that greedy continuations vary and penalties change them.
CONFIG = zaya_jax.ZayaConfig(
    vocab_size=256, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, moe_intermediate_size=40, num_experts=8, router_hidden_size=16, tie_word_embeddings=False,
    initializer_range=0.2, max_position_embeddings=256, layer_types=["hybrid", "hybrid_sliding"], sliding_window=8,
)
PROMPTS = [[5, 17, 99, 3, 42], [200, 1, 1, 1, 7, 8, 9, 10]]
NEW = 24
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "unit": {"enum": ["cm", "km"]}},
          "required": ["n", "unit"], "additionalProperties": False}


@pytest.fixture(scope="module")
def params():
    return zaya_jax.init(CONFIG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    return Engine(params, CONFIG, slots=4, max_len=64, decode_steps=8)


def openai_logits(logits, generated, presence, frequency, bias):
    """OpenAI's definition in numpy: logits[j] - c[j] * frequency - (c[j] > 0) * presence + bias[j], c[j] the
    count of j among the generated tokens."""
    c = np.bincount(np.asarray(generated, np.int64), minlength=logits.shape[-1]).astype(np.int32)
    out = logits.astype(np.float32) - (c * np.float32(frequency) + (c > 0) * np.float32(presence)).astype(np.float32)
    for token, b in bias.items():
        out[token] += np.float32(b)
    return out


def test_apply_is_openai_formula():
    rng = np.random.default_rng(0)
    M, V, K = 3, 50, 4
    logits = rng.normal(size=(M, V)).astype(np.float32) * 5
    counts = rng.integers(0, 4, (M, V)).astype(np.int32)
    presence, frequency = np.float32([0.5, 0.0, -2.0]), np.float32([1.5, 0.0, 0.25])
    bias_ids = np.array([[3, 7, -1, -1], [-1] * 4, [0, 49, 10, -1]], np.int32)
    bias = np.where(bias_ids >= 0, rng.uniform(-100, 100, (M, K)), 0).astype(np.float32)
    p = pen.Penalties(presence=jnp.asarray(presence), frequency=jnp.asarray(frequency), bias_ids=jnp.asarray(bias_ids),
                      bias=jnp.asarray(bias))
    out = np.asarray(jax.jit(pen.apply)(jnp.asarray(logits), p, jnp.asarray(counts)))
    for m in range(M):
        generated = np.repeat(np.arange(V), counts[m])
        want = openai_logits(logits[m], generated, presence[m], frequency[m],
                             {int(t): b for t, b in zip(bias_ids[m], bias[m]) if t >= 0})
        np.testing.assert_array_equal(out[m], want)
    np.testing.assert_array_equal(out[1], logits[1])  # a row without penalties keeps its logits bit for bit


def test_zero_penalties_leave_tokens_identical(params, engine):
    plain = Engine(params, CONFIG, slots=4, max_len=64, decode_steps=8, penalties=False)
    knobs = dict(max_new_tokens=NEW, temperature=[0.0, 1.0], seed=4, stop_token_ids=[])
    assert engine.generate(PROMPTS, **knobs).tokens == plain.generate(PROMPTS, **knobs).tokens
    with pytest.raises(ValueError, match="no penalty state"):
        plain.submit(PROMPTS[0], max_new_tokens=4, presence_penalty=0.5)


@pytest.mark.parametrize("presence, frequency, bias", [(0.0, 1.5, {}), (1.0, 0.0, {}), (0.6, 0.3, {9: 3.0, 40: -2.5}),
                                                       (-0.5, -0.25, {})])
def test_greedy_tokens_follow_openai_formula_on_forward_logits(params, engine, presence, frequency, bias):
    """Each greedy token is the argmax of forward's logits after the numpy formula, with the counts of the tokens
    generated before it (where the top two differ by more than the parity tolerance)."""
    knobs = dict(max_new_tokens=NEW, stop_token_ids=[])
    plain = engine.generate(PROMPTS, **knobs).tokens
    out = engine.generate(PROMPTS, presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias, **knobs)
    assert out.tokens != plain, "the penalties changed nothing: the test proves nothing"
    checked = 0
    for prompt, tokens in zip(PROMPTS, out.tokens):
        seq = np.asarray(prompt + tokens[:-1], np.int32)[None]
        logits = np.asarray(zaya_jax.forward(params, CONFIG, seq))[0, len(prompt) - 1:]  # [NEW, V]
        for t, token in enumerate(tokens):
            scores = openai_logits(logits[t], tokens[:t], presence, frequency, bias)
            top2 = np.sort(scores)[-2:]
            if top2[1] - top2[0] > 1e-4:
                assert token == int(np.argmax(scores)), f"step {t}"
                checked += 1
    assert checked >= 0.9 * 2 * NEW


def test_logit_bias_minus_100_bans_and_plus_100_forces(engine):
    knobs = dict(max_new_tokens=NEW, stop_token_ids=[])
    plain = engine.generate(PROMPTS, **knobs).tokens
    banned = {t: -100 for t in set(plain[0]) | set(plain[1])}
    out = engine.generate(PROMPTS, logit_bias=banned, **knobs).tokens
    assert not set(banned) & {t for row in out for t in row}
    forced = engine.generate(PROMPTS, logit_bias={77: 100}, temperature=1.0, seed=1, **knobs).tokens
    assert forced == [[77] * NEW] * 2


@pytest.mark.parametrize("bad, message", [
    (dict(presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a number"),
    (dict(logit_bias={256: 1.0}), r"logit_bias token 256 is not a token id in the vocabulary \[0, 256\)"),
    (dict(logit_bias={3: 101}), r"logit_bias of token 3 must be a number in \[-100, 100\]"),
    (dict(logit_bias={i: 1 for i in range(pen.MAX_LOGIT_BIAS + 1)}), "logit_bias has 301 entries; at most 300"),
    (dict(logit_bias=[1, 2]), "logit_bias must be a mapping"),
])
def test_bad_penalties_are_named(engine, bad, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(PROMPTS[0], max_new_tokens=4, **bad)


# ------------------------------------------------------------------------------------------------ grammars
@pytest.fixture(scope="module")
def demo():
    config, params = zaya_jax.load(DEFAULT_MODEL_DIR)
    tok = Tokenizer.from_dir(DEFAULT_MODEL_DIR)
    vocab = constraints.GrammarVocabulary(tok.tokenizer, config.vocab_size, config.eos_token_id)
    return Engine(params, config, slots=8, max_len=128, decode_steps=8), tok, vocab


def test_constrained_samples_validate_against_the_schema(demo):
    engine, tok, vocab = demo
    grammar = vocab.compile({"type": "json_schema", "json_schema": {"name": "measure", "schema": SCHEMA}})
    prompt = tok.encode_chat([{"role": "user", "content": "47+85+26"}])
    # Beside them, an unconstrained request: its tokens are those it has alone.
    free = engine.submit(prompt, max_new_tokens=40, temperature=1.0, seed=9)
    out = engine.generate([prompt] * 4, max_new_tokens=40, temperature=[0.0] + [1.0] * 3, seed=2, grammar=grammar)
    while engine.busy:
        engine.step()
    texts = [tok.decode(t[:-1], skip_special_tokens=True) for t in out.tokens]
    assert out.stop_reasons == ["stop_token"] * 4 and len(set(texts)) > 1
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert free.tokens == engine.generate([prompt], max_new_tokens=40, temperature=1.0, seed=9).tokens[0]


def test_json_object_and_a_cut_generation(demo):
    engine, tok, vocab = demo
    prompt = tok.encode_chat([{"role": "user", "content": "12+34"}])
    out = engine.generate([prompt] * 2, max_new_tokens=40, temperature=1.0, seed=3,
                          grammar=vocab.compile({"type": "json_object"}))
    for tokens, reason in zip(out.tokens, out.stop_reasons):
        text = tok.decode(tokens, skip_special_tokens=True)
        if reason == "stop_token":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_new_tokens: a prefix of an object
            assert reason == "max_new_tokens" and text.startswith("{")
    cut = engine.generate([prompt], max_new_tokens=5, grammar=vocab.compile(
        {"type": "json_schema", "json_schema": {"name": "measure", "schema": SCHEMA}}))
    assert cut.stop_reasons == ["max_new_tokens"] and tok.decode(cut.tokens[0]) == '{"n":'


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "look", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}}}},
     "(?s)cannot compile the schema 'look': .*look-around"),
    ({"type": "json_schema", "json_schema": {"name": "ref", "schema": {"$ref": "#/nowhere"}}},
     "cannot compile the schema 'ref'"),
    ({"type": "yaml"}, "response_format type must be 'text', 'json_object' or 'json_schema'"),
    ({"type": "json_schema"}, "needs a `json_schema` object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "needs a `name`"),
])
def test_bad_response_formats_are_named(demo, response_format, message):
    with pytest.raises(constraints.GrammarError, match=message):
        demo[2].compile(response_format)


def test_a_grammar_needs_its_end_token_among_the_stops(demo):
    engine, tok, vocab = demo
    with pytest.raises(ValueError, match=r"\[4\] must be among the request's stop token ids"):
        engine.submit([2, 10], max_new_tokens=8, stop_token_ids=[], grammar=vocab.compile({"type": "json_object"}))
