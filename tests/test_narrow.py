"""Row-blocked matmuls against bfloat16 weights (``zaya_jax.narrow``): the blocks cover the weight, the
products equal a float32 matmul of the same weights, and the model takes the path exactly when it pays:
Dense layers with bfloat16 or quantized weights for a few rows, a quantized LM head, on CPU only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zaya_jax import model, narrow, quant


def test_row_blocks():
    assert narrow.row_block(2048, 4096) == 512  # 8 MiB of float32
    assert narrow.row_block(24, 10**9) == 1 and narrow.row_block(24, 1) == 8  # a power of two dividing the rows
    assert narrow.fitting_rows(2048) == 1024 and narrow.fitting_rows(10**9) == 1  # the head's blocks need not divide


def test_blocked_matmul_equals_float32_matmul(monkeypatch):
    monkeypatch.setattr(narrow, "CONVERT_BLOCK_BYTES", 4 * 40 * 4)  # 4-row blocks: 12 of them
    stack = jax.random.normal(jax.random.key(0), (3, 48, 40)).astype(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(1), (2, 5, 48)).astype(jnp.bfloat16)
    got = jax.jit(lambda i: narrow.blocked_matmul(x, stack, (i,)))(jnp.int32(2))
    assert got.shape == (2, 5, 40) and got.dtype == jnp.float32
    want = x.astype(jnp.float32) @ stack[2].astype(jnp.float32)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)  # float32 accumulation of exact products


def test_dense_uses_blocks_only_for_narrow_weights_and_few_rows(monkeypatch):
    calls = []
    real = narrow.blocked_matmul
    monkeypatch.setattr(narrow, "blocked_matmul", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    layer = model.Dense(40, (None, None), jnp.bfloat16, jax.nn.initializers.normal(1.0))
    x = jax.random.normal(jax.random.key(1), (2, 1, 48), jnp.bfloat16)
    # (Dense's `init` field shadows Module.init.)
    params = nn.unbox(nn.Module.init(layer, jax.random.key(0), x))
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    calls.clear()
    y = layer.apply(params, x)
    kernel = params["params"]["kernel"]
    assert calls == [(2, 1, 48)] and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(x @ kernel, np.float32), rtol=2e-2, atol=2e-2)
    long = jax.random.normal(jax.random.key(2), (2, narrow.MAX_ROWS, 48), jnp.bfloat16)
    layer.apply(params, long)  # 128 rows: a prefill, the plain dot
    f32 = model.Dense(40, (None, None), jnp.float32, jax.nn.initializers.normal(1.0))
    f32.apply(nn.Module.init(f32, jax.random.key(0), x), x.astype(jnp.float32))  # float32 weights: the plain dot
    assert len(calls) == 1


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
def test_blocked_logits_cover_a_vocabulary_the_blocks_do_not_divide(tied, scheme, monkeypatch):
    V, K = 40, 256
    monkeypatch.setattr(narrow, "CONVERT_BLOCK_BYTES", 16 * K * 4)  # blocks of 16 entries: 2 whole, then 8
    head = jax.random.normal(jax.random.key(0), (V, K) if tied else (K, V)).astype(jnp.bfloat16)
    if scheme:
        head = quant.quantize(head, 1 if tied else 0, quant.scheme(scheme))
    x = jax.random.normal(jax.random.key(1), (2, 3, K)).astype(jnp.bfloat16)
    got = jax.jit(lambda x, h: narrow.blocked_logits(x, h, tied))(x, head)
    w = quant.dequantize(head, jnp.float32)
    want = x.astype(jnp.float32) @ (w.T if tied else w)
    assert got.shape == (2, 3, V) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_head_uses_blocks_only_for_quantized_weights(monkeypatch):
    """A quantized head, tied or not, is read in blocks for any number of rows; a bfloat16 or float32 head
    keeps XLA:CPU's own dot (as fast as the blocks for a bfloat16 head at decode shapes)."""
    calls = []
    real = narrow.blocked_logits
    monkeypatch.setattr(narrow, "blocked_logits", lambda *a: calls.append((a[0].shape, a[2])) or real(*a))
    emb = jax.random.normal(jax.random.key(0), (40, 24)).astype(jnp.bfloat16)
    one, four = jnp.ones((1, 1, 24), jnp.bfloat16), jnp.ones((4, 1, 24), jnp.bfloat16)
    model.head_logits(one, emb, True)
    model.head_logits(four, emb.T, False)
    model.head_logits(one.astype(jnp.float32), emb.astype(jnp.float32), True)
    assert calls == []
    model.head_logits(one, quant.quantize(emb, 1, quant.scheme("int8")), True)
    model.head_logits(four, quant.quantize(emb.T, 0, quant.scheme("int8")), False)
    prefill = jnp.ones((1, narrow.MAX_ROWS + 1, 24), jnp.bfloat16)
    model.head_logits(prefill, quant.quantize(emb, 1, quant.scheme("int8")), True)
    assert calls == [((1, 1, 24), True), ((4, 1, 24), False), ((1, narrow.MAX_ROWS + 1, 24), True)]
