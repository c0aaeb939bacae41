"""The Keras wiring of DP-SGD.

Modules:
  dp_config: the privacy hyper-parameters of a model (`DPConfig`).
  dp_model: `DPKerasModel` and `make_private`: the private `train_step`.
  fit_inputs: which `fit` inputs keep the guarantee.
  model_checks, precision, labels: models, dtypes and labels refused or
    filtered before training.
  callbacks: the privacy accountant that stops training at the budget.
  checkpointing: checkpoints that carry the privacy ledger.
"""
