"""Loss and gradients of every parameter against transformers' ``loss.backward()`` on the same batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_ref
import zaya_jax
from zaya_jax.dtypes import BALANCING_BIASES
from zaya_jax.formats import layout
from zaya_jax.train import balance, loss

LENGTHS = [16, 11, 6]  # right-padded rows of unequal length


def right_padded(lengths, vocab, seed):
    rng = np.random.default_rng(seed)
    S = max(lengths)
    ids = np.zeros((len(lengths), S), np.int64)
    mask = np.zeros((len(lengths), S), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = rng.integers(1, vocab, n)
        mask[b, :n] = 1
    # Targets: every real token but a few, so the loss mask is not just the attention mask.
    loss_mask = mask * (rng.random(mask.shape) > 0.2)
    return ids, mask, loss_mask


def hf_loss_and_grads(model, ids, mask, loss_mask):
    labels = torch.as_tensor(np.where(loss_mask.astype(bool), ids, -100))
    model.zero_grad()
    out = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().numpy() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads


@pytest.mark.parametrize("name, chunk", [("tiny", 7), ("untied", None), ("sliding", 5)])
def test_loss_and_gradients_match_transformers(name, chunk, tmp_path):
    model = hf_ref.build(name, tmp_path, seed=3, skip_bias=0.05)
    ids, mask, loss_mask = right_padded(LENGTHS, model.config.vocab_size, seed=4)
    ref_loss, ref_grads = hf_loss_and_grads(model, ids, mask, loss_mask)

    config, params = zaya_jax.load(tmp_path)
    trainable, biases = balance.split_biases(params)
    batch = {"tokens": jnp.asarray(ids, jnp.int32), "mask": jnp.asarray(mask), "loss_mask": jnp.asarray(loss_mask)}

    def mean_loss(p):
        total, (count, _) = loss.masked_ce_sum(balance.merge_biases(p, biases), config, batch, chunk=chunk)
        return total / count

    value, grads = jax.jit(jax.value_and_grad(mean_loss))(trainable)
    assert abs(float(value) - ref_loss) <= 1e-4 * abs(ref_loss)

    checked, worst = 0, 0.0
    for hf_name, entry, layer in layout.expected_tensors(config):
        if entry.path == BALANCING_BIASES:
            continue  # a buffer in transformers, state (not a parameter) here
        ours = np.asarray(layout.get_path(grads, entry.path))
        ours = ours[layer] if layer is not None else ours
        ref = entry.to_jax(ref_grads[hf_name], config)
        rel = np.linalg.norm(ours - ref) / max(np.linalg.norm(ref), 1e-30)
        assert rel <= 1e-4, f"{hf_name}: relative gradient error {rel:.2e}"
        checked, worst = checked + 1, max(worst, rel)
    print(f"{name}: loss {float(value):.6f} vs {ref_loss:.6f}; {checked} gradients, worst relative error {worst:.1e}")
    assert checked == len(ref_grads), "some transformers gradients were not compared"
    # Layer 0 has no router_states_scale in transformers; ours multiplies a zero router state there,
    # so its gradient must be exactly zero.
    assert np.all(np.asarray(grads["layers"]["router"]["state_scale"][0]) == 0.0)
