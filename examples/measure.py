"""Measures the first-day workflows: test accuracy non-private, clipped without noise, private.

Each workflow runs in this process three ways: its non-private keras.io-style
code (`<name>_keras.py`), its private port (`<name>_private.py`, epsilon 8
at delta 1e-5), and the private port with the noise turned off (the same
clipping, batches and optimizer: what the noise costs). Prints a Markdown
table of test accuracies.

  python examples/measure.py [label ...]
"""

import contextlib
import importlib
import sys
import time

import tan_keras

# (label, module name, main's arguments)
WORKFLOWS = (
    ("structured_data", "structured_data", {}),
    ("text (Conv1D)", "text", {"kind": "conv1d"}),
    ("text (Transformer)", "text", {"kind": "transformer"}),
    ("image_augmentation", "image_augmentation", {}),
    ("transfer_learning", "transfer_learning", {}),
    ("subclassed_callbacks", "subclassed_callbacks", {}),
    ("time_series", "time_series", {}),
)


@contextlib.contextmanager
def noise_off():
    """make_private_with_epsilon and private_adapt with the noise turned off."""
    original = tan_keras.make_private_with_epsilon, tan_keras.private_adapt

    def without_noise(model, *, target_epsilon, delta, epochs, verbose=True, **kwargs):
        del target_epsilon, delta, epochs, verbose
        kwargs.setdefault("l2_norm_clip", 1.0)  # make_private_with_epsilon's default
        return tan_keras.make_private(model, noise_multiplier=0.0, **kwargs)

    def plain_adapt(layer, data, **kwargs):
        # The baseline is not private: the exact statistics, vouched for.
        layer.adapt(data)
        tan_keras.mark_public(layer, "measure.py's noiseless baseline, not a private run")

    tan_keras.make_private_with_epsilon, tan_keras.private_adapt = without_noise, plain_adapt
    try:
        yield
    finally:
        tan_keras.make_private_with_epsilon, tan_keras.private_adapt = original


def run(name, mode, **kwargs):
    """Test accuracy and seconds of one workflow in one mode."""
    module = importlib.import_module(f"{name}_{'keras' if mode == 'keras' else 'private'}")
    start = time.time()
    with noise_off() if mode == "clipped" else contextlib.nullcontext():
        accuracy = module.main(verbose=0, **kwargs)
    return accuracy, time.time() - start


def main(labels):
    print("| workflow | non-private | clipped, no noise | private (eps 8) | private / clipped |")
    print("|---|---|---|---|---|")
    for label, name, kwargs in WORKFLOWS:
        if labels and label not in labels:
            continue
        results = {mode: run(name, mode, **kwargs) for mode in ("keras", "clipped", "private")}
        cells = [f"{results[m][0]:.3f} ({results[m][1]:.0f} s)" for m in results]
        ratio = results["private"][0] / results["clipped"][0]
        print(f"| {label} | {' | '.join(cells)} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
