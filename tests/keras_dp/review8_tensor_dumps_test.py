"""Review round 8: TensorFlow's tensor dumps around a private fit.

`tf.debugging.experimental.enable_dump_debug_info(..., "FULL_TENSOR")` wrote
every training row to disk during a private fit (a review found all 64).
Refused before any update while the dump is on.
"""

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import tan_keras
from tan_keras.keras_dp import debug_dumps

ROWS, BATCH = 16, 8


def _fit():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    dp_model = tan_keras.make_private(
        model, l2_norm_clip=1.0, noise_multiplier=1.0, expected_batch_size=BATCH, dataset_size=ROWS
    )
    dp_model.compile(keras.optimizers.SGD(0.1), "mse")
    x = np.random.default_rng(0).normal(size=(ROWS, 4)).astype("float32")
    try:
        dp_model.fit(x, np.zeros((ROWS, 1), "float32"), batch_size=BATCH, epochs=1, verbose=0)
    finally:
        steps = int(dp_model.dp_steps)
    return steps


@pytest.fixture
def dumping(tmp_path):
    tf.debugging.experimental.enable_dump_debug_info(str(tmp_path), tensor_debug_mode="FULL_TENSOR")
    yield tmp_path
    tf.debugging.experimental.disable_dump_debug_info()


def test_a_private_fit_is_refused_while_tensorflow_dumps_tensors(dumping):
    with pytest.raises(ValueError, match=r"enable_dump_debug_info.*off during private training"):
        _fit()


def test_power_check_without_the_refusal_the_dump_is_written(dumping, monkeypatch):
    monkeypatch.setattr(debug_dumps, "refuse_tensor_dumps", lambda: None)
    assert _fit() > 0
    tf.debugging.experimental.disable_dump_debug_info()
    written = [p for p in glob.glob(os.path.join(dumping, "**", "*"), recursive=True)]
    assert any(os.path.getsize(p) > 0 for p in written if os.path.isfile(p))


def test_after_disabling_the_dump_the_fit_trains(tmp_path):
    tf.debugging.experimental.enable_dump_debug_info(str(tmp_path))
    tf.debugging.experimental.disable_dump_debug_info()
    assert _fit() > 0
