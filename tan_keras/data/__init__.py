"""Datasets and augmentations.

Modules:
  datasets: the TFDS and bundled datasets the training program reads.
  augment: crops, flips and colour jitter, stateless when given a seed.
"""
