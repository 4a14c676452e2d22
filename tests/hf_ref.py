"""Reference helpers: random transformers ZAYA checkpoints built locally, and their logits."""

from __future__ import annotations

import numpy as np
import torch
import transformers

import zaya_jax

# Small configs covering the architecture's knobs (native transformers schema).
TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, moe_intermediate_size=32, num_experts=4, router_hidden_size=16)
CONFIGS = {
    "tiny": TINY,
    "sliding": dict(TINY, num_hidden_layers=4, layer_types=["hybrid", "hybrid_sliding", "hybrid_sliding", "hybrid"],
                    sliding_window=4),
    "heads_conv": dict(TINY, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                       cca_time0=3, cca_time1=4, num_experts=6, moe_intermediate_size=24),
    "untied": dict(TINY, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=1, head_dim=8,
                   tie_word_embeddings=False, cca_time0=1, cca_time1=3),
}


def randomize(model: torch.nn.Module, seed: int, skip_bias: float = 0.0) -> None:
    """Gives every parameter and buffer a random non-trivial value (the HF init leaves temp at 0,
    scales at 1 and biases at 0, which would hide layout mistakes).

    ``skip_bias`` is added to the skip route's balancing bias so that some tokens take it.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if "inv_freq" in name or not p.is_floating_point():
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith(("scale", "norm.weight", "layernorm.weight")):
                value = 1.0 + 0.2 * noise
            elif name.endswith("temp"):
                value = 0.5 + torch.rand(p.shape, generator=g) * 1.5
            elif name.endswith("balancing_biases"):
                value = 0.05 * noise
                value[-1] += skip_bias
            elif name.endswith("bias"):
                value = 0.1 * noise
            elif "embed_tokens" in name or "lm_head" in name:
                value = noise
            else:
                value = noise / np.sqrt(p.shape[-1] if p.ndim > 1 else 1.0)
            p.copy_(value.to(p.dtype))


def build(name_or_kwargs, path=None, seed: int = 0, skip_bias: float = 0.0):
    """A random ``ZayaForCausalLM`` (float32, eager attention); saved to ``path`` when given."""
    kwargs = CONFIGS[name_or_kwargs] if isinstance(name_or_kwargs, str) else name_or_kwargs
    torch.manual_seed(seed)
    config = transformers.ZayaConfig(**kwargs)
    config._attn_implementation = "eager"
    model = transformers.ZayaForCausalLM(config).eval()
    randomize(model, seed, skip_bias)
    if path is not None:
        model.save_pretrained(path)
    return model


def left_padded(lengths, vocab: int, seed: int = 0, pad_id: int = 0):
    """Random ids [B, max(lengths)] left-padded with ``pad_id``, and the 1/0 mask."""
    rng = np.random.default_rng(seed)
    S = max(lengths)
    ids = np.full((len(lengths), S), pad_id, np.int64)
    mask = np.zeros((len(lengths), S), np.int64)
    for b, n in enumerate(lengths):
        ids[b, S - n:] = rng.integers(1, vocab, n)
        mask[b, S - n:] = 1
    return ids, mask


def logits(model, ids, mask) -> np.ndarray:
    """HF logits [B, S, V] float32; positions count real tokens (as zaya-jax does under left padding)."""
    ids_t, mask_t = torch.as_tensor(ids), torch.as_tensor(mask)
    positions = torch.clamp(mask_t.cumsum(-1) - 1, min=0)
    with torch.no_grad():
        out = model(input_ids=ids_t, attention_mask=mask_t, position_ids=positions)
    return out.logits.float().numpy()


def max_logit_error(model_dir, ids, mask, ref: np.ndarray, moe_impl: str = "auto") -> float:
    """Max abs difference, over the real (unpadded) positions, between zaya-jax's float32 logits of the
    model in ``model_dir`` (its MoE dispatched by ``moe_impl``) and ``ref [B, S, V]``."""
    config, params = zaya_jax.load(model_dir)
    out = np.asarray(zaya_jax.forward(params, config, ids, mask, moe_impl=moe_impl))
    real = mask.astype(bool)
    return float(np.abs(out[real] - ref[real]).max())
