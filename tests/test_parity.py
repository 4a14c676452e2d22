"""Full-model logit parity against transformers' ZAYA on random checkpoints built here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_ref
import zaya_jax

LENGTHS = [12, 7, 1]  # a left-padded batch of unequal lengths (with a 1-token row)


@pytest.fixture(scope="module", params=sorted(hf_ref.CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    # skip_bias pushes some tokens onto the skip route, so the native "zero" output is exercised.
    model = hf_ref.build(request.param, path, seed=1, skip_bias=0.05)
    ids, mask = hf_ref.left_padded(LENGTHS, model.config.vocab_size, seed=2)
    return request.param, path, model, ids, mask, hf_ref.logits(model, ids, mask)


def test_float32_logits_match(checkpoint):
    name, path, _, ids, mask, ref = checkpoint
    err = hf_ref.max_logit_error(path, ids, mask, ref)
    print(f"{name}: float32 max abs logit error {err:.2e} (logit scale {np.abs(ref[mask.astype(bool)]).max():.1f})")
    assert err <= 1e-4


def test_float32_logits_match_in_query_blocks(checkpoint, monkeypatch):
    """The same parity with the prompt's attention split into query blocks of 4 (model.causal_attention)."""
    name, path, _, ids, mask, ref = checkpoint
    monkeypatch.setattr(zaya_jax.model, "ATTENTION_BLOCK", 4)
    jax.clear_caches()  # a compiled forward keeps the block size it was traced with
    try:
        err = hf_ref.max_logit_error(path, ids, mask, ref)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    print(f"{name}: float32 max abs logit error in query blocks of 4: {err:.2e}")
    assert err <= 1e-4


def test_float32_logits_match_through_the_dense_moe_path(checkpoint):
    """The same parity through ``dense``, the MoE path ``auto`` picks for TPU decode (XLA:CPU's picks are above)."""
    name, path, _, ids, mask, ref = checkpoint
    err = hf_ref.max_logit_error(path, ids, mask, ref, moe_impl="dense")
    print(f"{name}: float32 max abs logit error with moe_impl=dense: {err:.2e}")
    assert err <= 1e-4


def test_skip_route_is_taken(checkpoint):
    """The random checkpoints must actually exercise the skip route, or the parity above proves less."""
    _, path, _, ids, mask, _ = checkpoint
    config, params = zaya_jax.load(path)
    ctx = zaya_jax.model.uncached_context(jnp.asarray(mask))
    _, _, aux = zaya_jax.apply(params, config, jnp.asarray(ids, jnp.int32), ctx)
    counts = np.asarray(aux["route_counts"])
    assert counts.sum() == config.num_hidden_layers * mask.sum()
    assert counts[:, -1].sum() > 0, "no token took the skip route"
    assert (counts[:, :-1].sum(axis=1) > 0).all(), "a layer routed no token to a real expert"
    assert (counts[:, :-1].sum(axis=0) > 0).sum() >= 3, "fewer than 3 distinct experts used"


def test_left_padding_is_exact(checkpoint):
    """Each row of the padded batch equals that row run alone without padding."""
    _, path, _, ids, mask, _ = checkpoint
    config, params = zaya_jax.load(path)
    batched = np.asarray(zaya_jax.forward(params, config, ids, mask))
    for b, n in enumerate(LENGTHS):
        alone = np.asarray(zaya_jax.forward(params, config, ids[b : b + 1, -n:]))
        # Different batch shapes reassociate float sums (~1e-5 here); a padding leak would be O(1).
        np.testing.assert_allclose(batched[b, -n:], alone[0], atol=1e-4, rtol=0)


def test_bfloat16_agreement(checkpoint):
    """bfloat16 params vs the float32 reference: top-1 agreement and mean KL, reported."""
    name, path, _, ids, mask, ref = checkpoint
    config, params = zaya_jax.load(path, dtype=jnp.bfloat16)
    assert params["embed"].dtype == jnp.bfloat16
    assert params["layers"]["router"]["balancing_biases"].dtype == jnp.float32
    out = np.asarray(zaya_jax.forward(params, config, ids, mask))
    real = mask.astype(bool)
    top1 = (out[real].argmax(-1) == ref[real].argmax(-1)).mean()

    def logp(x):
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    p_ref = np.exp(logp(ref[real]))
    kl = (p_ref * (logp(ref[real]) - logp(out[real]))).sum(-1).mean()
    print(f"{name}: bfloat16 top-1 agreement {top1:.3f}, mean KL {kl:.4f} nats")
    assert np.isfinite(out).all()
    assert top1 >= 0.8 and kl < 0.2
