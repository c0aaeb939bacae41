"""Shared test set-up: quiet TensorFlow, one thread pool for the 2-core CI."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
