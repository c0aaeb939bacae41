"""The DP-SGD mechanism, in TensorFlow.

Modules:
  clipping: per-example gradients clipped to L2 norm C and summed.
  noise: the Gaussian noise of std sigma*C, drawn from a secret key.
  chunking: large logical batches as fixed-size micro-batches.
  sampling: Poisson sampling of the logical batches.
  views: the K augmented views of an example (augmentation multiplicity).
  per_example: the per-example gradient routes and their choice;
    ghost (ghost norms), layerwise (closed-form per-layer gradients) and
    tapping (the taps both read) implement them.
  model_analysis: which Keras layers and model graphs each route accepts.
  provenance: preprocessing state adapted on data, refused unless declared
    public (`mark_public`) or privately adapted (in a model or an augmenter).
  moments: a private mean and variance of bounded features (numpy), the
    mechanism of `tan_keras.private_adapt`.

Nothing here imports the Keras model wiring (`tan_keras.keras_dp`) or the
training program.
"""
