"""Markov RSA on a small random model: structure, reproducibility, accounting, special cases, errors."""

import dataclasses
import tracemalloc

import jax
import pytest

import zaya_jax
from zaya_jax.infer import Engine, rsa
from zaya_jax.infer.evaluate import Problem, check_context

CONFIG = zaya_jax.ZayaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                             router_hidden_size=16, max_position_embeddings=512, eos_token_id=(3,))
TEMPLATE = rsa.TokenTemplate(round0_prefix=(2, 5), round0_suffix=(6,), agg_prefix=(2, 5, 7), agg_middle=(8, 9),
                             headers=((10, 11), (10, 12), (10,)), separator=(13,), agg_suffix=(14, 6))
QUESTIONS = [[20, 21, 22, 23], [30, 31]]
N, C, T, BUDGET, TAU = 5, 3, 2, 10, 4


@pytest.fixture(scope="module")
def params():
    return zaya_jax.init(CONFIG, jax.random.key(7))


@pytest.fixture(scope="module")
def run(params):
    return rsa.markov_rsa(params, CONFIG, QUESTIONS, population=N, tails=C, rounds=T, budget=BUDGET,
                          tail_tokens=TAU, template=TEMPLATE, seed=11)


def _expected_prompt(question, tails):
    body = [t for c, tail in enumerate(tails) for t in TEMPLATE.headers[c] + tuple(tail) + TEMPLATE.separator]
    return list(TEMPLATE.agg_prefix) + question + list(TEMPLATE.agg_middle) + body + list(TEMPLATE.agg_suffix)


def test_structure_subsets_tails_prompts(run):
    assert len(run.rounds) == T + 1
    assert run.rounds[0].subsets is None
    assert run.rounds[0].prompts[1][0] == [2, 5] + QUESTIONS[1] + [6]
    overhead = len(TEMPLATE.agg_prefix) + len(TEMPLATE.agg_middle) + len(TEMPLATE.agg_suffix) + \
        sum(len(h) + len(TEMPLATE.separator) for h in TEMPLATE.headers)
    for t in range(1, T + 1):
        prev, cur = run.rounds[t - 1], run.rounds[t]
        for p, question in enumerate(QUESTIONS):
            for i in range(N):
                subset = cur.subsets[p][i]
                assert len(set(subset)) == C and all(0 <= s < N for s in subset)
                assert cur.prompts[p][i] == _expected_prompt(question, [prev.tails[p][s] for s in subset])
                assert len(cur.prompts[p][i]) <= len(question) + C * TAU + overhead
    for rnd in run.rounds:
        for p in range(len(QUESTIONS)):
            for i in range(N):
                cand = rnd.candidates[p][i]
                assert rnd.tails[p][i] == cand[max(0, len(cand) - TAU):]
                assert len(cand) <= BUDGET and CONFIG.eos_token_id[0] not in cand


def test_token_accounting(run):
    for rnd in run.rounds:
        stops = sum(r == "stop_token" for row in rnd.stop_reasons for r in row)
        assert rnd.generated_tokens == sum(len(c) for row in rnd.candidates for c in row) + stops
        for row, reasons in zip(rnd.candidates, rnd.stop_reasons):
            for cand, reason in zip(row, reasons):
                assert reason in ("stop_token", "max_new_tokens")
                assert reason == "stop_token" or len(cand) == BUDGET
    assert run.generated_tokens == sum(r.generated_tokens for r in run.rounds)
    assert run.rounds[-1].longest_prompt == max(len(m) for row in run.rounds[-1].prompts for m in row)


def test_same_seed_reproduces(params, run):
    """The same search again, its settings as an RSAConfig (the keyword form above is the stable one)."""
    settings = rsa.RSAConfig(population=N, tails=C, rounds=T, budget=BUDGET, tail_tokens=TAU, seed=11)
    again = rsa.markov_rsa(params, CONFIG, QUESTIONS, settings, template=TEMPLATE)
    assert [r.candidates for r in again.rounds] == [r.candidates for r in run.rounds]
    assert [r.subsets for r in again.rounds] == [r.subsets for r in run.rounds]
    other = rsa.markov_rsa(params, CONFIG, QUESTIONS, population=N, tails=C, rounds=T, budget=BUDGET,
                           tail_tokens=TAU, template=TEMPLATE, seed=12)
    assert [r.candidates for r in other.rounds] != [r.candidates for r in run.rounds]


def test_rounds_zero_equals_generate(params):
    from zaya_jax.infer import generate

    res = rsa.markov_rsa(params, CONFIG, QUESTIONS[0], population=N, tails=2, rounds=0, budget=BUDGET,
                         tail_tokens=TAU, template=TEMPLATE.__class__(*(getattr(TEMPLATE, f) for f in (
                             "round0_prefix", "round0_suffix", "agg_prefix", "agg_middle")),
                             headers=TEMPLATE.headers[:2], separator=TEMPLATE.separator,
                             agg_suffix=TEMPLATE.agg_suffix), seed=5)
    gen = generate(params, CONFIG, [[2, 5] + QUESTIONS[0] + [6]] * N, max_new_tokens=BUDGET, temperature=1.0, seed=5)
    want = [toks[: len(toks) - (reason == "stop_token")] for toks, reason in zip(gen.tokens, gen.stop_reasons)]
    assert res.rounds[0].candidates[0] == want
    assert res.rounds[0].stop_reasons[0] == gen.stop_reasons


def test_single_tail_continues_own_and_full_chain(params):
    own = rsa.TokenTemplate((2,), (6,), (2,), (8,), ((10,),), (13,), (14,))
    res = rsa.markov_rsa(params, CONFIG, QUESTIONS[1], population=3, tails=1, rounds=1, budget=6,
                         tail_tokens=50, final_budget=4, template=own, seed=1)
    assert res.rounds[1].subsets == [[[0], [1], [2]]]
    for i in range(3):  # tail_tokens >= budget: the whole candidate is carried (full-chain RSA)
        assert res.rounds[0].tails[0][i] == res.rounds[0].candidates[0][i]
        assert res.rounds[1].prompts[0][i] == [2] + QUESTIONS[1] + [8, 10] + res.rounds[0].candidates[0][i] + [13, 14]
    assert all(len(c) <= 4 for c in res.rounds[1].candidates[0])  # final_budget applies to the last round


@pytest.mark.parametrize("kwargs, match", [
    (dict(tails=6), "tails .* cannot exceed population"),
    (dict(tail_tokens=0), "tail_tokens"),
    (dict(budget=600), "beyond the context"),
    (dict(rounds=-1), "rounds"),
])
def test_impossible_settings(params, kwargs, match):
    args = dict(population=5, tails=3, rounds=1, budget=8, tail_tokens=4, template=TEMPLATE)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        rsa.markov_rsa(params, CONFIG, QUESTIONS[0], **args)


def test_rsa_config_presets_and_checks():
    """The report's APEX presets (Table XIII) by constructor and by name, overrides, and refusals naming the
    field: a bool is not an integer (``population=True`` once ran a population of one)."""
    light, high, extra = rsa.RSAConfig.report_light(), rsa.RSAConfig.report_high(), rsa.RSAConfig.report_extra_high()
    assert light.knobs == dict(population=16, tails=4, rounds=2, budget=8192, tail_tokens=4096)
    assert high.knobs == dict(population=16, tails=4, rounds=8, budget=16384, tail_tokens=4096)
    assert extra.knobs == dict(population=32, tails=4, rounds=8, budget=32768, tail_tokens=4096)
    assert rsa.RSAConfig.preset("light", budget=512) == dataclasses.replace(light, budget=512)
    assert light.round_budget(2) == 8192 and rsa.RSAConfig.report_light(final_budget=5).round_budget(2) == 5
    assert rsa.RSAConfig.report_light(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)
    with pytest.raises(ValueError, match="unknown rsa mode 'medium'"):
        rsa.RSAConfig.preset("medium")
    for field, value in [("population", True), ("tails", 2.0), ("rounds", False), ("rounds", -1), ("budget", 0),
                         ("tail_tokens", None), ("final_budget", True), ("seed", True), ("seed", 2**63),
                         ("temperature", float("nan")), ("top_p", 0.0), ("stop_token_ids", "34"),
                         ("stop_token_ids", [3, -1])]:
        with pytest.raises(ValueError, match=field):
            rsa.RSAConfig.report_light(**{field: value})


def test_questions_and_engine_checked_before_any_round(params):
    args = dict(population=5, tails=3, rounds=1, budget=8, tail_tokens=4, template=TEMPLATE)
    for question, match in [("4785", "token ids, not text"), ([4.5, 7.0], "integer token ids"),
                            ([[1, 2], ["a"]], "integer token ids"), ([True, False], "integer token ids")]:
        with pytest.raises(ValueError, match=match):
            rsa.markov_rsa(params, CONFIG, question, **args)
    small = Engine(params, CONFIG, slots=2, max_len=16)
    with pytest.raises(ValueError, match=r"the search needs a context of \d+ tokens .*the engine's max_len is 16"):
        rsa.markov_rsa(params, CONFIG, QUESTIONS[0], engine=small, **args)
    assert not small.busy  # refused before round 0 was submitted


def test_stable_interface():
    from zaya_jax.infer import markov_rsa

    assert markov_rsa is rsa.markov_rsa


def test_extract_boxed_and_majority():
    assert rsa.extract_boxed(r"so \boxed{12} then \boxed{\frac{1}{2}} done") == r"\frac{1}{2}"
    assert rsa.extract_boxed("no answer") is None
    assert rsa.extract_boxed(r"\boxed{unclosed") is None
    assert rsa.majority(["3", None, "4", "3"]) == ("3", 0.5)
    assert rsa.majority(["4", "3"]) == ("4", 0.5)
    assert rsa.majority([None, None]) == (None, 0.0)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random model directory with a character-level tokenizer and a chat template."""
    import hf_ref
    from zaya_jax.demo import vocab

    path = tmp_path_factory.mktemp("text_model")
    hf_ref.build(dict(hf_ref.TINY, vocab_size=101, eos_token_id=4, bos_token_id=2, pad_token_id=0), path, seed=0)
    vocab.write(str(path))
    return path


def test_prompts_decode_to_the_rendered_template(text_model):
    from zaya_jax.infer.tokenizer import Tokenizer

    config, params = zaya_jax.load(text_model)
    tok = Tokenizer.from_dir(text_model)
    question = "12+34+56"
    res = rsa.markov_rsa(params, config, tok.encode(question, add_special_tokens=False), population=3, tails=2,
                         rounds=1, budget=6, tail_tokens=3, temperature=1.0, seed=0, tokenizer=tok)
    template = rsa.AggregationTemplate.default(2)
    chat = lambda content: tok.render_chat([{"role": "user", "content": content}], add_generation_prompt=True)  # noqa: E731
    assert tok.decode(res.rounds[0].prompts[0][0]) == chat(question)
    for i in range(3):
        tails = [tok.decode(res.rounds[0].tails[0][s]) for s in res.rounds[1].subsets[0][i]]
        assert tok.decode(res.rounds[1].prompts[0][i]) == chat(template.render(question, tails))
    assert res.texts[0] == [tok.decode(c) for c in res.rounds[1].candidates[0]]


def test_cli(text_model, capsys):
    import json

    from zaya_jax.cli import main

    assert main(["rsa", str(text_model), "--prompt", "1+2", "--population", "3", "--tails", "2", "--rounds", "1",
                 "--budget", "5", "--tail-tokens", "3", "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["settings"]["population"] == 3 and len(out["problems"][0]["rounds"]) == 2
    assert out["generated_tokens"] == sum(r["generated_tokens"] + r["stop_reasons"].count("stop_token")
                                          for r in out["problems"][0]["rounds"])
    assert "round 1/1" in captured.err
    assert main(["rsa", str(text_model), "--prompt", "1+2", "--population", "2", "--tails", "3"]) == 2
    assert "cannot exceed population" in capsys.readouterr().err


def test_cli_on_the_demo_model_runs_the_demo_settings(capsys):
    import json

    from zaya_jax.cli import main
    from zaya_jax.demo import data

    assert main(["rsa", "--prompt", "47+85+26", "--population", "4", "--rounds", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"] == dict(population=4, tails=data.TAILS, rounds=1, budget=data.BUDGET,
                                   tail_tokens=data.TAIL_TOKENS, final_budget=data.BUDGET)
    # aggregating with the template it was trained on, the demo model answers in \boxed{}
    assert all(rsa.extract_boxed(text) is not None for text in out["problems"][0]["final_texts"])
    assert main(["rsa", "--prompt", "47+85+26", "--mode", "light"]) == 2  # APEX budgets exceed its context
    assert "more than the maximum length 1024" in capsys.readouterr().err


def test_full_chain_tails_and_budget_messages(params):
    """tail_tokens >= budget is full-chain RSA (tails are whole candidates), not a context overflow; a budget
    beyond the context names every setting involved (final_budget included)."""
    args = dict(population=4, tails=3, rounds=1, budget=6, template=TEMPLATE, seed=4)
    whole = rsa.markov_rsa(params, CONFIG, QUESTIONS[0], tail_tokens=6, **args)
    huge = rsa.markov_rsa(params, CONFIG, QUESTIONS[0], tail_tokens=10**6, **args)
    assert huge.rounds[1].prompts == whole.rounds[1].prompts and huge.majority == whole.majority
    with pytest.raises(ValueError, match=r"final_budget=1000000000"):
        rsa.markov_rsa(params, CONFIG, QUESTIONS[0], tail_tokens=4, final_budget=10**9, **args)
    # zaya eval's check (which names the data line) sizes prompts as the search does: it accepts what ran above.
    problem = Problem(index=0, id="0", question="q", answer="1", line=7)
    ran = rsa.RSAConfig(population=4, tails=3, rounds=1, budget=6, tail_tokens=10**6)
    check_context([problem], [QUESTIONS[0]], TEMPLATE, ran, CONFIG.max_position_embeddings, "f.jsonl")
    with pytest.raises(ValueError, match="f.jsonl:7: an aggregation prompt .* more than the model's context"):
        check_context([problem], [QUESTIONS[0]], TEMPLATE, dataclasses.replace(ran, final_budget=10**9),
                      CONFIG.max_position_embeddings, "f.jsonl")


def test_rounds_are_not_allocated_up_front():
    """Per-round state grows as rounds run: a search of 10**7 rounds starts in the memory of one (it took ~1 GB)."""
    tracemalloc.start()
    search = rsa.RSASearch(CONFIG, QUESTIONS[0], rsa.RSAConfig(population=4, tails=3, rounds=10**7, budget=6,
                                                               tail_tokens=4), template=TEMPLATE)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert search.rsa.rounds == 10**7 and peak < 10 * 2**20
