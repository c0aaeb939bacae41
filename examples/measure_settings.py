"""Measures the image_augmentation workflow privately and clipped under other settings.

The "Settings that train" rows of the README: the workflow's model and data,
SGD with momentum 0.9 at a learning rate, an expected batch size and an
augmult; test accuracy at epsilon 8 (delta 1e-5) and with the noise off.

  python examples/measure_settings.py LR,B,AUGMULT [LR,B,AUGMULT ...]
  python examples/measure_settings.py 2.0,256,4
"""

import sys
import time

import image_augmentation_private as workflow
import keras

import tan_keras
from tan_keras.data import workflow_data


def run(learning_rate, expected_batch_size, augmult, noise, epochs=10, train_size=12_000):
    """Test accuracy of one run (noise False: the same run, sigma 0)."""
    (x, y), (x_test, y_test) = workflow_data.shapes(train_size)
    model = workflow.build_model()
    settings = dict(
        expected_batch_size=expected_batch_size,
        dataset_size=int(0.8 * train_size),
        augmult=augmult,
    )
    if noise:
        model = tan_keras.make_private_with_epsilon(
            model, target_epsilon=8, delta=1e-5, epochs=epochs, verbose=False, **settings
        )
    else:
        model = tan_keras.make_private(model, noise_multiplier=0.0, l2_norm_clip=1.0, **settings)
    optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x, y, batch_size=32, epochs=epochs, validation_split=0.2, verbose=0)
    return model.evaluate(x_test, y_test, verbose=0, return_dict=True)["accuracy"]


def main(specs):
    print("| settings | clipped | private | private / clipped |")
    print("|---|---|---|---|")
    for spec in specs:
        learning_rate, batch, augmult = spec.split(",")
        found = {}
        for noise in (False, True):
            start = time.time()
            found[noise] = run(float(learning_rate), int(batch), int(augmult), noise)
            print(f"  noise={noise}: {found[noise]:.3f} ({time.time() - start:.0f} s)", flush=True)
        cells = f"{found[False]:.3f} | {found[True]:.3f} | {found[True] / found[False]:.2f}"
        print(f"| SGD {learning_rate}, momentum 0.9, B {batch}, augmult {augmult} | {cells} |")


if __name__ == "__main__":
    main(sys.argv[1:] or ["2.0,256,4"])
