"""The Keras wiring of DP-SGD.

Modules:
  dp_config: the privacy hyper-parameters of a model (`DPConfig`).
  dp_model: `DPKerasModel`, built from mixins: fit_entry (`fit` and the Keras
    entry points around it), train_step (one micro-batch up to its update),
    noisy_update (the noisy update, the EMA), secret_state (the ledger's
    counters, the step cap, the logical step's sums).
  wrap: `make_private` and `make_private_with_epsilon`.
  fit_inputs: which `fit` inputs keep the guarantee.
  model_checks, precision, labels, id_inputs: models, dtypes, labels and
    out-of-range ids refused or filtered before training.
  ledger: the privacy ledger, bound to the weights it protects (both backends).
  plain_training: plain Keras training of private weights refused (both backends).
  budget: `make_private_with_epsilon`, calibrated to a budget (both backends).
  step_identity: each Poisson micro-batch checked against the ledger.
  private_adapt: a Normalization adapted with noise, accounted in the ledger.
  callbacks: the privacy accountant that stops training at the budget.
  checkpointing: checkpoints that carry the privacy ledger.
"""
