"""Shared test set-up: quiet TensorFlow; the shared helpers importable.

The tests mirror the package (tests/mechanism/ for tan_keras/mechanism/...);
the modules they share (`_helpers`, the subprocess workers) stay here, at
the top, importable from every folder.
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
