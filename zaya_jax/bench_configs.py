"""The model configs the benchmarks run, by name: keyword arguments that both ``zaya_jax.ZayaConfig``
and ``transformers.ZayaConfig`` accept, so the two frameworks build the same model.

``bench-124M``: 124M parameters (8 layers, D = F = 512, 16 experts), big enough that compute, not
dispatch, dominates on a CPU; ``tiny``: 0.1M parameters, for smoke runs.
"""

from __future__ import annotations

CONFIGS = {
    "bench-124M": dict(vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2, head_dim=64, num_experts=16, moe_intermediate_size=512,
                       router_hidden_size=128),
    "tiny": dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, moe_intermediate_size=32, num_experts=4, router_hidden_size=16),
}
