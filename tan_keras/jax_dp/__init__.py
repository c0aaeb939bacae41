"""DP-SGD on Keras 3's JAX backend (`KERAS_BACKEND=jax`): no TensorFlow imported.

Modules:
  clipped_sum: the sum of clipped per-example gradients (vmap over examples,
    a scan over chunks, `shard_map` over devices) and the Gaussian noise.
  poisson_steps: Poisson-sampled logical steps over in-memory arrays, with
    the noise key of each step drawn from OS entropy.
  dp_model: `DPKerasModel` and `make_private` for the JAX backend.
"""
