"""Inference: sampler, decode loop, tokenizer and chat, Markov RSA (installed as ``zaya_jax.infer``)."""
