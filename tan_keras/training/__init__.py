"""The training program as a library.

Modules:
  train_config: the program's settings (`TrainConfig`), each checked alone
    and in combination before any work.
  train_flags: the typed command-line flags of those settings, on any absl
    FlagValues.
  train_plan: the privacy plan of a configuration, printed before training.
  train_data: the program's input pipelines.
  train_lib: the pieces of a run: strategy, model, checkpoints, fit, metrics.
  program: one run, `run(config) -> metrics`.
  search_lib: the cheap hyper-parameter search: grid points as typed
    overrides of one configuration, run in process, finished runs reused.
  search_results: its ranking, scaling law, ledger and final command.

`python -m tan_keras.train` and `python -m tan_keras.search` are the thin
command lines over it.
"""
