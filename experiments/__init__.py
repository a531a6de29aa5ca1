"""Experiments layer: models, data, configs and the training job for inq_jax/comq_jax."""
