"""DP-SGD on Keras 3's JAX backend (`KERAS_BACKEND=jax`): no TensorFlow imported.

Modules:
  clipped_sum: the sum of clipped per-example gradients (vmap over examples,
    a scan over chunks, `shard_map` over devices) and the Gaussian noise.
  ghost_norms: Dense and convolution kernels and Embedding tables clipped
    without vmapped gradients (ghost norms, gradients formed from patches).
  poisson_steps: Poisson-sampled logical steps over in-memory arrays, with
    the noise key of each step drawn from OS entropy.
  example_loss: one example's loss (its K views), per-example randomness,
    the refusal of layers (and losses) that write state while training.
  traced_loss: that loss traced before training: calls into Python and
    copies of training data refused.
  training_rows: the training rows a fit registers, kept out of validation.
  train_logs: the training statistics of the drawn examples only.
  fit_arrays: what `fit` accepts (in-memory arrays), checked first.
  jax_step: the devices and the state of Keras's stateless train step.
  step_count: the ledger's count of updates, the accountants' caps.
  ema: the exponential moving average of the weights.
  clipped_fraction: the privately released clipped fraction.
  model_config: the arguments, configs and methods the model accepts.
  fit_entry: `fit`, its checks before any update, the ledger around it.
  dp_model: `DPKerasModel` for the JAX backend.
  wrap: `make_private` and `make_private_with_epsilon`.
"""
