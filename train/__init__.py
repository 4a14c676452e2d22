"""Fine-tuning: loss, train step, balancing-bias update, data, loop (installed as ``zaya_jax.train``)."""
