"""Small models and one-step drivers shared by the DP tests."""

import pathlib
import re

import keras
import numpy as np
import tensorflow as tf

from tan_keras.keras_dp.dp_model import DPKerasModel
from tan_keras.mechanism import content_digest, sampling

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def dense_model(inputs=4, hidden=5, classes=3, seed=0):
    """A tiny functional MLP with fixed initial weights."""
    keras.utils.set_random_seed(seed)
    inp = keras.Input((inputs,))
    h = keras.layers.Dense(hidden, activation="tanh")(inp)
    return keras.Model(inp, keras.layers.Dense(classes)(h))


def dp_model(base, lr=0.1, jit_compile=False, **dp_kwargs):
    """Wraps `base` (sharing nothing: a copy of its weights) as a compiled DP model."""
    clone = keras.models.clone_model(base)
    clone.set_weights(base.get_weights())
    model = DPKerasModel(inputs=clone.inputs, outputs=clone.outputs, **dp_kwargs)
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS, jit_compile=jit_compile)
    return model


def micro_batches(x, y, mask, ends, model=None):
    """A dataset of stacked micro-batches (x, y, mask, step_end[, identity]).

    With `model`, each micro-batch carries the sampling identity the model
    expects (its steps numbered from `model.sampling_position` when an iterator
    starts, as `fit` resumes a Poisson pipeline's sampler there), so that a
    model with sampling="poisson" takes it, epoch after epoch; without, the
    caller-drawn protocol (x, y, mask, step_end) of sampling="caller_poisson".
    """
    parts = (
        np.asarray(x, np.float32),
        np.asarray(y, np.int32),
        np.asarray(mask, np.float32),
        np.asarray(ends, bool),
    )
    if model is None:
        return tf.data.Dataset.from_tensor_slices(parts)
    rows = parts[2].shape[1] if parts[2].ndim > 1 else 1
    return _numbered(model, parts, parts[3], rows)


def _numbered(model, parts, ends, rows):
    """`parts` (stacked micro-batches) with identities numbered from the model's position.

    The numbering starts when an iterator starts (as `fit` resumes a Poisson
    pipeline's sampler then), after `fit` has merged whatever ledger the
    model's weights bring.
    """
    relative = identities(model, ends, rows=rows, start_step=0)
    data = tf.data.Dataset.from_tensor_slices(parts + (relative,))
    counter = model.sampling_position
    offset = np.zeros(len(sampling.IDENTITY_COLUMNS), np.int64)
    offset[0] = 1

    def numbered(_):
        start = tf.cast(counter.read_value(), tf.int64)
        return data.map(lambda *e: (*e[:-1], seal_row_content(e, e[-1] + start * offset)))

    numbered_data = tf.data.Dataset.from_tensors(0).flat_map(numbered)
    return numbered_data.apply(tf.data.experimental.assert_cardinality(len(relative)))


def seal_row_content(element, identity):
    """`identity` with the digest of the element's (x, y, mask), as the sampler writes it."""
    return content_digest._seal(tuple(element[:3]), identity)


def sealed(dataset):
    """A dataset of (x, y, mask, step_end, identity) elements with their content sealed."""
    return dataset.map(lambda *e: (*e[:4], seal_row_content(e, e[4])))


def identities(model, ends, rows, start_step=None, source=7):
    """[micro-batches, rows, 9] identities of consecutive steps ending where `ends` says.

    Their content column is 0: seal each element (`sealed`, `seal_row_content`).
    """
    config = model.dp_config
    step = int(model.sampling_position.numpy()) if start_step is None else start_step
    ends = np.asarray(ends, bool)
    # One flag per micro-batch, or repeated on its rows.
    ends = [bool(e) for e in (ends[:, 0] if ends.ndim == 2 else ends)]
    out, begin = [], 0

    def micro_batch(step, index, count):
        tag = [step, index, count, config.dataset_size, config.expected_batch_size, source]
        columns = np.tile(np.asarray(tag, np.int64), (rows, 1))
        positions = np.arange(rows, dtype=np.int64)[:, None]
        count = np.full((rows, 1), rows, np.int64)
        return np.concatenate([columns, positions, count, np.zeros((rows, 1), np.int64)], axis=1)

    for index, end in enumerate(ends):
        if end:
            count = index - begin + 1
            out.extend(micro_batch(step, m, count) for m in range(count))
            step, begin = step + 1, index + 1
    # A trailing partial step: numbered as if it had one more micro-batch.
    left = len(ends) - begin
    out.extend(micro_batch(step, m, left + 1) for m in range(left))
    return np.stack(out)


def step_dataset(model, x, y, mask=None):
    """One logical step of one micro-batch for `model`: (x, y, mask, step_end, identity).

    `x` and `y` may be structures (lists, dicts) of per-example arrays.
    """
    rows = len(tf.nest.flatten(y)[0])
    mask = np.ones(rows, np.float32) if mask is None else np.asarray(mask, np.float32)
    element = (x, y, mask, np.ones(rows, bool))
    batched = tf.nest.map_structure(lambda t: np.asarray(t)[None], element)
    return _numbered(model, batched, [True], rows)


def one_step(model, x, y, mask=None, micro=1):
    """Runs one logical step over `micro` equal micro-batches; returns weights."""
    x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
    mask = np.ones(len(x), np.float32) if mask is None else np.asarray(mask, np.float32)
    size = len(x) // micro
    ds = micro_batches(
        x.reshape((micro, size) + x.shape[1:]),
        y.reshape(micro, size),
        mask.reshape(micro, size),
        [i == micro - 1 for i in range(micro)],
        model=None if model.dp_config.sampling == "caller_poisson" else model,
    )
    model.fit(ds, epochs=1, verbose=0)
    return [v.numpy() for v in model.trainable_variables]


def flat(weights):
    return np.concatenate([np.ravel(w) for w in weights])


def updates_by_clipping_mode(base, x, y, modes, micro=2, lr=0.5, **dp_kwargs):
    """One logical step from `base`'s weights for each `clipping` mode.

    Returns:
      {mode: flat weights after the step}; each model is checked to really
      use its mode.
    """
    results = {}
    for mode in modes:
        clone = keras.models.clone_model(base)
        clone.set_weights(base.get_weights())
        model = DPKerasModel(clone.inputs, clone.outputs, clipping=mode, **dp_kwargs)
        model.compile(optimizer=keras.optimizers.SGD(lr), loss=LOSS)
        assert model.clipping == mode
        results[mode] = flat(one_step(model, x, y, micro=micro))
    return results


def refusal_line(code, stderr, name=None):
    """Checks the command lines' refusal contract and returns its one line.

    Exit status 2, exactly one "error: ..." line on stderr (the last one), no
    traceback; with `name`, the line names that flag in backticks.
    """
    assert code == 2, (code, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-2000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    assert stderr.rstrip().endswith(lines[0]), stderr[-2000:]
    if name is not None:
        assert f"`{name}`" in lines[0], lines[0]
    return lines[0]


def released_fraction_ok(released, truth, std, alpha=1e-6):
    """Whether released per-step noisy fractions are `truth` plus N(0, std^2) noise.

    The statistical test of a noisy clipped fraction: for the errors
    released - truth (n of them), a two-sided chi-square interval on their
    sample variance (n - 1 degrees of freedom) and a z-bound on their mean
    (known std), each at level alpha / 2, so a correct implementation fails
    with probability at most alpha.
    """
    from scipy import stats

    errors = np.asarray(released, np.float64) - np.asarray(truth, np.float64)
    n = errors.size
    low, high = stats.chi2.ppf([alpha / 4, 1 - alpha / 4], n - 1) / (n - 1)
    std_ok = low <= errors.var(ddof=1) / std**2 <= high
    mean_ok = abs(errors.mean()) <= stats.norm.ppf(1 - alpha / 4) * std / np.sqrt(n)
    return bool(std_ok and mean_ok)


def per_step_values(running_means):
    """The values whose running means (a Keras Mean metric's result after each) are given."""
    means = np.asarray(running_means, np.float64)
    count = np.arange(1, means.size + 1)
    totals = count * means
    return np.diff(np.r_[0.0, totals])


# Training statistics computed without noise on the private examples (what
# --release=private must keep out of every output), and a printed "name: value".
NOISELESS = ("loss", "accuracy", "grad_norm", "clipped_fraction", "nonfinite_examples")
_PRINTED_NOISELESS = re.compile(r"(?<![\w])(" + "|".join(NOISELESS) + r")[:=]\s*[-\d.]")


def noiseless_statistics_released(run_dir, printed):
    """Where a finished run released noiseless training statistics.

    Args:
      run_dir: The run's model_dir.
      printed: Everything the run printed (stdout and stderr).

    Returns:
      {"tensorboard": tags of the training logs (not the validation ones,
      which are held-out data) naming one, "printed": names printed with a
      value ("val_loss", "test_accuracy", "noisy_clipped_fraction" do not
      count), "files": other files whose text names one}.
    """
    found = {"tensorboard": set(), "printed": set(), "files": set()}
    for events in pathlib.Path(run_dir, "tensorboard").rglob("events.out.tfevents*"):
        if "validation" in events.parts:
            continue
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for value in event.summary.value:
                name = value.tag.removeprefix("epoch_").removeprefix("batch_")
                if name in NOISELESS:
                    found["tensorboard"].add(value.tag)
    found["printed"] = {m.group(1) for m in _PRINTED_NOISELESS.finditer(printed)}
    for path in pathlib.Path(run_dir).rglob("*.json"):
        text = path.read_text()
        found["files"] |= {name for name in NOISELESS if re.search(rf'"{name}"\s*:\s*[-\d.]', text)}
    return found


def trained_dense_private(n, b, steps, dp):
    """(private dense model trained `steps` noisy updates on fixed data, the model it wraps).

    Every step is one micro-batch (`pad_steps`, P = n), so the fit runs
    exactly `steps` updates.
    """
    import tan_keras

    base = dense_model()
    private = tan_keras.make_private(base, **dp)
    private.compile(optimizer=keras.optimizers.SGD(0.1), loss=LOSS)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = rng.integers(0, 3, n).astype(np.int32)
    sampler = sampling.PoissonSampler(n, b, physical_batch_size=n, pad_steps=True)
    private.fit(sampling.make_poisson_dataset(x, y, sampler), steps_per_epoch=steps, verbose=0)
    assert int(private.dp_steps.numpy()) == steps
    return private, base


def forget_remembered_values():
    """What a fresh process knows of private values: nothing (`ledger._REMEMBERED`)."""
    from tan_keras.keras_dp import ledger

    ledger._REMEMBERED.clear()
    ledger._LOADED.clear()
