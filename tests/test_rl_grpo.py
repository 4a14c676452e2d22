"""GRPO's advantages and objective: tied groups make no update; the objective's gradient is REINFORCE's
(at ratio 1, nothing clipped) computed by hand from the plain forward; clipping and the k3 KL; the
objective's temperature must be the rollouts'; settings must be finite; a user's verifier that fails is named."""

import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import CONFIG
from zaya_jax import model as zmodel
from zaya_jax.cli import main
from zaya_jax.train import balance, grpo, loss, rewards, rl_loop, step

B, S, P = 4, 12, 5  # rollouts, tokens, prompt tokens


def test_group_advantages():
    adv = grpo.group_advantages([1, 0, 0, 1, 2, 2, 2, 2], group=4)
    np.testing.assert_allclose(adv[:4], [1, -1, -1, 1], atol=1e-6)  # (r - 0.5) / 0.5
    assert np.all(adv[4:] == 0)  # a tied group teaches nothing
    with pytest.raises(ValueError, match="whole groups of 3"):
        grpo.group_advantages([1, 0], group=3)


@pytest.fixture(scope="module")
def params():
    return zmodel.init(CONFIG, jax.random.key(0))


def _batch(params, advantages):
    """Rollouts of random tokens: prompt of P, response after; old log-probs = the current policy's."""
    tokens = jax.random.randint(jax.random.key(1), (B, S), 0, CONFIG.vocab_size)
    mask = jnp.ones((B, S), jnp.int32).at[1, S - 3:].set(0)  # one shorter response (right padding)
    loss_mask = jnp.zeros((B, S), jnp.int32).at[:, P:].set(1)
    old, _, _ = jax.jit(lambda p, t, m: loss.next_token_logprobs(p, CONFIG, t, m))(params, tokens, mask)
    return {"tokens": tokens, "mask": mask, "loss_mask": loss_mask, "old_logprobs": old,
            "advantages": jnp.asarray(advantages, jnp.float32)}


def test_tied_rewards_make_no_update(params):
    tcfg = step.TrainConfig(learning_rate=1e-2, warmup_steps=0, total_steps=2, weight_decay=0.0, bias_rate=0.0)
    advantages = grpo.group_advantages([1.0] * B, group=B)
    state = step.init_state(jax.tree.map(jnp.copy, params), tcfg)  # the step donates the state
    before = jax.tree.map(np.asarray, state.params)
    run = step.make_train_step(CONFIG, tcfg, objective=grpo.GRPOObjective(kl_coef=0.0))
    state, metrics = run(state, _batch(params, advantages))
    assert float(metrics["grad_norm"]) == 0.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state.params)))


def test_gradient_is_reinforce_by_hand(params):
    """At ratio 1 (old log-probs = current) nothing is clipped, and d(loss)/d(theta) is
    -(1/N) sum_b A_b sum_t grad log p(token_t), N the response tokens: checked against log-probs taken
    from the plain forward's logits with jax.nn.log_softmax."""
    advantages = np.array([1.5, -0.5, 0.25, -1.25], np.float32)
    batch = _batch(params, advantages)
    trainable, biases = balance.split_biases(params)
    tcfg = step.TrainConfig()

    def objective(p):
        total, (count, _, _) = grpo.GRPOObjective()(balance.merge_biases(p, biases), CONFIG, batch, tcfg)
        return total / count

    def by_hand(p):
        full = balance.merge_biases(p, biases)
        logits, _, _ = zmodel.apply(full, CONFIG, batch["tokens"], zmodel.uncached_context(batch["mask"]))
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        token_logp = jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]  # [B, S-1]
        w = (batch["loss_mask"][:, 1:] * batch["mask"][:, 1:]).astype(jnp.float32)
        return -jnp.sum(advantages[:, None] * token_logp * w) / jnp.sum(w)

    g = jax.jit(jax.grad(objective))(trainable)
    want = jax.jit(jax.grad(by_hand))(trainable)
    worst = max(float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-12))
                for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)) if float(jnp.linalg.norm(b)) > 0)
    assert worst < 1e-4, worst
    assert float(optax.tree.norm(g)) > 0


def test_clipping_and_kl():
    obj = grpo.GRPOObjective(clip_low=0.2, clip_high=0.3, kl_coef=0.5)
    old = jnp.zeros(4)
    logp = jnp.log(jnp.array([0.5, 1.0, 1.5, 1.5]))  # ratios 0.5, 1, 1.5, 1.5
    adv = jnp.array([-1.0, 1.0, 1.0, -1.0])
    per_token, stats = obj.token_losses(logp, old, adv, ref_logp=logp)
    # ratio 0.5 with A < 0: clipped at 0.8 (the pessimistic min keeps the clipped term); 1.5 with A > 0: at 1.3.
    np.testing.assert_allclose(per_token, [0.8, -1.0, -1.3, 1.5], rtol=1e-6)
    np.testing.assert_array_equal(stats["clip_fraction"], [1, 0, 1, 0])
    np.testing.assert_array_equal(stats["kl"], 0.0)  # reference = policy: k3 is exactly 0
    _, stats = obj.token_losses(jnp.zeros(1), old[:1], adv[:1], ref_logp=jnp.log(jnp.array([0.5])))
    np.testing.assert_allclose(stats["kl"], [0.5 - np.log(0.5) - 1], rtol=1e-6)  # k3 = r - log r - 1, r = ref/pi


def test_objective_temperature_must_be_the_rollouts():
    rcfg = rl_loop.RLConfig(steps=1, temperature=0.7)
    with pytest.raises(ValueError, match=r"rollouts' temperature \(0.7\)"):
        rl_loop.train_rl(CONFIG, None, None, step.TrainConfig(total_steps=1, warmup_steps=0), rcfg, grpo.GRPOObjective(),
                         "unused")
    with pytest.raises(ValueError, match="temperature must be > 0"):
        grpo.GRPOObjective(temperature=0.0)


def test_settings_must_be_finite():
    """A NaN passes every `<` and `>` check; it must be refused, not train a NaN model (`zaya rl --lr nan`)."""
    for make in (lambda: step.TrainConfig(learning_rate=float("nan")), lambda: step.TrainConfig(clip_norm=float("inf")),
                 lambda: grpo.GRPOObjective(kl_coef=float("inf")), lambda: grpo.GRPOObjective(clip_low=float("nan"))):
        with pytest.raises(ValueError, match="finite"):
            make()
    with pytest.raises(ValueError, match="temperature must be finite and > 0"):
        rl_loop.RLConfig(steps=1, temperature=float("inf"))
    # Signs that train uphill without a word: a negative clip flips the gradient, a negative final ratio the lr.
    for kwargs, message in ((dict(clip_norm=-1.0), "clip_norm must be > 0"),
                            (dict(final_lr_ratio=-2.0), r"final_lr_ratio must be in \[0, 1\]"),
                            (dict(weight_decay=-0.1), "weight_decay must be >= 0")):
        with pytest.raises(ValueError, match=message):
            step.TrainConfig(**kwargs)


def _verifier_module(monkeypatch):
    module = types.ModuleType("user_verifiers")
    module.one_arg = lambda text: 1.0
    module.raises = lambda text, answer: 1 / 0
    module.none = lambda text, answer: None
    module.word = lambda text, answer: "yes"
    module.nan = lambda text, answer: float("nan")
    module.ok = lambda text, answer: text == answer
    monkeypatch.setitem(sys.modules, "user_verifiers", module)


@pytest.mark.parametrize("name, message", [
    ("one_arg", r"user_verifiers:one_arg raised TypeError"),
    ("raises", r"user_verifiers:raises raised ZeroDivisionError"),
    ("none", r"user_verifiers:none returned None, not a number"),
    ("word", r"user_verifiers:word returned 'yes', not a number"),
    ("nan", r"user_verifiers:nan returned nan: rewards must be finite"),
])
def test_a_broken_verifier_is_named(monkeypatch, name, message):
    _verifier_module(monkeypatch)
    verify = rewards.load_verifier(f"user_verifiers:{name}")
    with pytest.raises(ValueError, match=message):
        verify("\\boxed{1}", "1")


def test_a_broken_verifier_is_refused_before_the_run_directory(monkeypatch, tmp_path, capsys):
    _verifier_module(monkeypatch)
    assert rewards.load_verifier("user_verifiers:ok")("1", "1") == 1.0  # a bool is a number
    data, out = tmp_path / "p.jsonl", tmp_path / "run"
    data.write_text('{"question": "1+1", "answer": "2"}\n')
    assert main(["rl", "--data", str(data), "--out", str(out), "--verifier", "user_verifiers:none", "--steps", "1"]) == 2
    assert "returned None, not a number" in capsys.readouterr().err and not out.exists()
