"""Statistics over runs: no TensorFlow.

Modules:
  scaling: the log-linear scaling law fitted on simulations.
  auditing: empirical lower bounds on epsilon from membership tests.
"""
