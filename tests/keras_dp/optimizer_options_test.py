"""Optimizer options a Keras project may carry into DPKerasModel.

`gradient_accumulation_steps` averages several noisy DP gradients before
the optimizer moves the weights: every one of them is a released, accounted
update (post-processing keeps the guarantee), and the weights follow the
average of the clipped steps.
"""

import keras
import numpy as np
from _helpers import LOSS, dense_model, flat, micro_batches

from tan_keras.keras_dp.dp_model import DPKerasModel

B = 6


def _model(base, optimizer):
    clone = keras.models.clone_model(base)
    clone.set_weights(base.get_weights())
    model = DPKerasModel(
        inputs=clone.inputs,
        outputs=clone.outputs,
        l2_norm_clip=0.5,
        noise_multiplier=0.0,
        expected_batch_size=B,
        dataset_size=100,
    )
    model.compile(optimizer=optimizer, loss=LOSS)
    return model


def test_gradient_accumulation_steps_averages_counted_noisy_steps():
    base = dense_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, B, 4)).astype(np.float32)
    y = rng.integers(0, 3, (2, B)).astype(np.int32)
    start = flat(base.trainable_variables)

    def one_step(index):
        # The reference: a fresh model's single DP step on micro-batch `index`.
        model = _model(base, keras.optimizers.SGD(0.3))
        model.fit(
            micro_batches(
                x[index : index + 1], y[index : index + 1], np.ones((1, B)), [True], model
            ),
            verbose=0,
        )
        return flat(model.trainable_variables) - start

    model = _model(base, keras.optimizers.SGD(0.3, gradient_accumulation_steps=2))
    model.fit(micro_batches(x[:1], y[:1], np.ones((1, B)), [True], model), verbose=0)
    np.testing.assert_array_equal(flat(model.trainable_variables), start)
    assert int(model.dp_steps.numpy()) == 1  # released (and accounted), not yet applied
    model.fit(micro_batches(x[1:], y[1:], np.ones((1, B)), [True], model), verbose=0)
    assert int(model.dp_steps.numpy()) == 2
    expected = start + (one_step(0) + one_step(1)) / 2
    np.testing.assert_allclose(flat(model.trainable_variables), expected, atol=1e-6)
    # Power check: the second step alone is not what was applied.
    assert not np.allclose(flat(model.trainable_variables), start + one_step(1), atol=1e-4)
