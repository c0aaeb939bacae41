"""A random-access source of examples as `fit`'s input on the JAX backend (no TensorFlow)."""

import concurrent.futures

import _jax_helpers as helpers
import jax.numpy as jnp
import numpy as np
import pytest

from tan_keras.data import image_views
from tan_keras.jax_dp import example_source, poisson_steps


class _Recorded:
    """Example i is (row i of x, label i); every index asked for is recorded."""

    def __init__(self, x, y):
        self.x, self.y, self.asked = x, y, []

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        self.asked.append(index)
        return self.x[index], self.y[index]


# A source of one's own: its caller vouches that each index is one person and
# source[i] always example i (`fit_arrays._check_source_promise`).
_PROMISE = dict(repeated_rows="distinct_people")


def test_a_step_asks_the_source_for_each_drawn_example_once_and_pads_with_zeros():
    x = np.arange(1, 101, dtype="float32")[:, None] * np.ones((1, 3), "float32")
    y = np.arange(1, 101).astype("int32")
    source = _Recorded(x, y)
    draws = poisson_steps.poisson_steps(
        example_source.source_rows(source), len(source), 0.2, 20, row_multiple=8
    )
    source.asked.clear()  # (example 0 was read for the shapes)
    for _ in range(20):
        step_x, step_y, step = next(draws)
        drawn = int(step["keep"].sum())
        asked, source.asked = source.asked, []
        assert len(asked) == drawn == len(set(asked))
        np.testing.assert_array_equal(step_y[:drawn], y[asked])
        np.testing.assert_array_equal(step_x[:drawn], x[asked])
        assert not step_x[drawn:].any() and not step_y[drawn:].any()


def test_fit_on_a_source_equals_fit_on_its_arrays_without_noise():
    # q = 1, sigma = 0: every example in every step, so the same update.
    x, y = helpers.data(16)
    by_arrays = helpers.private(helpers.dense_model(), 16)
    by_source = helpers.private(helpers.dense_model(), 16)
    by_source.set_weights(by_arrays.get_weights())
    arrays_update = helpers.update(by_arrays, x, y)
    source_update = helpers.update(by_source, _Recorded(x, y), None, **_PROMISE)
    np.testing.assert_allclose(
        helpers.flat(source_update), helpers.flat(arrays_update), rtol=1e-5, atol=1e-7
    )
    assert int(by_source.dp_steps) == 1


def test_fit_on_a_source_draws_poisson_steps_of_q():
    n, b, epochs = 200, 20, 5
    x, y = helpers.data(n)
    source = _Recorded(x, y)
    model = helpers.private(helpers.dense_model(), n, batch=b, noise_multiplier=1.0)
    model.fit(source, epochs=epochs, verbose=0, **_PROMISE)
    asked = len(source.asked) - 2  # example 0 read for the shapes, by fit and by the steps
    steps = epochs * n // b
    assert int(model.dp_steps) == steps
    # Binomial(n * steps, q): within 4 standard deviations of its mean.
    std = np.sqrt(n * steps * (b / n) * (1 - b / n))
    assert abs(asked - b * steps) < 4 * std


@pytest.mark.parametrize(
    "bad, message",
    [
        ("length", "dataset_size"),
        ("shape", r"source\[3\] must have the structure, shapes and dtypes"),
        ("split", "validation_split"),
        ("views", r"augmult=2 every input needs the shape \[2, ...\] per example"),
    ],
)
def test_a_source_that_does_not_fit_the_model_is_refused_by_name(bad, message):
    n = 40
    x, y = helpers.data(n)
    augmult = 2 if bad == "views" else 1
    if bad == "length":
        x, y = x[:-1], y[:-1]
    source = _Recorded(x, y)
    if bad == "shape":
        source.x = [row if i != 3 else row[:4] for i, row in enumerate(x)]
    model = helpers.private(helpers.dense_model(), n, augmult=augmult)
    fit = dict(validation_split=0.1, **_PROMISE) if bad == "split" else dict(_PROMISE)
    with pytest.raises(ValueError, match=message):
        model.fit(source, epochs=1, verbose=0, **fit)
    assert int(model.dp_steps) == 0


def test_augmented_images_train_a_conv_model_with_k_views():
    n, k = 32, 3
    rng = np.random.default_rng(0)
    images = rng.random((n, 8, 8, 3)).astype("float32")
    labels = rng.integers(0, 4, n).astype("int32")
    source = image_views.AugmentedImages(images, labels, augmult=k, policy="cifar", seed=1)
    views, label = source[5]
    assert views.shape == (k, 8, 8, 3) and label == labels[5]
    model = helpers.private(helpers.conv_model(), n, batch=16, augmult=k, noise_multiplier=1.0)
    history = model.fit(source, epochs=2, verbose=0)
    assert int(model.dp_steps) == 4 and np.isfinite(history.history["loss"]).all()


def _is_window(view, image, pad, mode):
    padded = np.pad(
        image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect" if mode == "REFLECT" else "constant"
    )
    h, w = image.shape[:2]
    windows = [padded[t : t + h, s : s + w] for t in range(2 * pad + 1) for s in range(2 * pad + 1)]
    return [v for v in windows if np.array_equal(v, view)], [
        v for v in windows if np.array_equal(v[:, ::-1], view)
    ]


@pytest.mark.parametrize("policy", ["digits", "cifar"])
def test_every_view_is_a_window_of_the_padded_image_and_digits_are_never_flipped(policy):
    rng = np.random.default_rng(0)
    image = rng.random((8, 8, 1)).astype("float32")
    pad, mode, flip, _ = checked = image_views.check_policy(policy, image.shape)
    views = image_views.views(image, 200, checked, np.random.default_rng(2))
    for view in views:
        straight, mirrored = _is_window(view, image, pad, mode)
        assert straight or mirrored
        # Zero padding tells a mirrored window from a straight one.
        assert straight or policy != "digits"


@pytest.mark.parametrize("flip", [True, False])
def test_a_view_is_mirrored_with_probability_one_half_when_flipping(flip):
    # (Zero padding, where a mirrored window is never a straight one; with
    # reflect padding the extreme windows are both.)
    image = np.random.default_rng(0).random((8, 8, 1)).astype("float32")
    policy = image_views.Policy(2, "CONSTANT", flip)
    views = image_views.views(image, 400, policy, np.random.default_rng(3))
    mirrored = sum(not _is_window(view, image, 2, "CONSTANT")[0] for view in views)
    if flip:  # Binomial(400, 1/2): 200 +- 4 * 10
        assert abs(mirrored - 200) < 40
    else:
        assert mirrored == 0


def test_a_policy_that_does_not_fit_is_refused_by_name():
    with pytest.raises(ValueError, match="augment.*3 channels"):
        image_views.check_policy("imagenet", (32, 32, 1))
    with pytest.raises(ValueError, match="augment.*reflect padding"):
        image_views.check_policy("cifar", (4, 4, 3))


def test_an_examples_views_do_not_depend_on_which_examples_were_drawn_before():
    # Review: one shared generator made every later example's views depend
    # on the earlier draws, so an example changed steps it was not in.
    images = np.random.default_rng(0).random((6, 8, 8, 1)).astype("float32")

    def views_of_5_after(earlier):
        source = image_views.AugmentedImages(images, np.arange(6), augmult=2, policy="cifar")
        for index in earlier:
            source[index]
        return source[5][0]

    np.testing.assert_array_equal(views_of_5_after([0, 1]), views_of_5_after([1]))
    np.testing.assert_array_equal(views_of_5_after([]), views_of_5_after([2, 3, 4]))
    # ... while its own draws differ call after call (fresh views every step).
    source = image_views.AugmentedImages(images, np.arange(6), augmult=2, policy="cifar")
    assert not np.array_equal(source[5][0], source[5][0])


class _Oversampled(_Recorded):
    """A wrapper that holds example 0 at 4 indices (oversampling a rare person)."""

    def __len__(self):
        return len(self.x) + 3

    def __getitem__(self, index):
        return super().__getitem__(max(0, index - 3))


@pytest.mark.parametrize("source_class", [_Recorded, _Oversampled])
def test_a_source_of_ones_own_trains_only_when_its_caller_vouches_for_it(source_class):
    # Review: an oversampling wrapper moved the update 4x past the bound, and
    # the model cannot see into a source's code: it is the caller's promise.
    n = 16
    x, y = helpers.data(n - (3 if source_class is _Oversampled else 0))
    model = helpers.private(helpers.dense_model(), n)
    with pytest.raises(ValueError, match=r"`repeated_rows`: expected 'distinct_people'"):
        model.fit(source_class(x, y), epochs=1, verbose=0)
    assert int(model.dp_steps) == 0
    model.fit(source_class(x, y), epochs=1, verbose=0, **_PROMISE)
    assert int(model.dp_steps) == 1


def test_a_subclass_of_augmented_images_needs_the_declaration_like_any_source():
    # Its own __getitem__ is code the model cannot see into (it could return
    # another example than the one asked for).
    class Remapped(image_views.AugmentedImages):
        def __getitem__(self, index):
            return super().__getitem__(0)

    rng = np.random.default_rng(0)
    images = rng.random((16, 8, 8, 3)).astype("float32")
    source = Remapped(images, rng.integers(0, 4, 16).astype("int32"), augmult=1, policy="cifar")
    model = helpers.private(helpers.conv_model(), 16)
    with pytest.raises(ValueError, match=r"`repeated_rows`: expected 'distinct_people'"):
        model.fit(source, epochs=1, verbose=0)
    assert int(model.dp_steps) == 0


def test_the_packages_images_load_on_several_threads_as_on_one():
    x, y = helpers.data(40, shape=(24, 24, 3))
    x = np.clip(x, 0.0, 1.0)
    indices = np.array([3, 17, 5, 39, 0, 22])
    serial = example_source.source_rows(image_views.AugmentedImages(x, y, 3, "imagenet"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        source = image_views.AugmentedImages(x, y, 3, "imagenet")
        assert example_source.loads_in_parallel(source)
        threaded = example_source.source_rows(source, pool)
        for _ in range(3):  # each example's second and third draws too
            (a, a_y), (b, b_y) = serial(indices, 8), threaded(indices, 8)
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a_y, b_y)
    # A source of one's own is asked one example at a time (its thread
    # safety is unknown), a subclass of the package's too.
    assert not example_source.loads_in_parallel(_Recorded(x, y))

    class Subclass(image_views.AugmentedImages):
        pass

    assert not example_source.loads_in_parallel(Subclass(x, y, 3, "imagenet"))


def test_images_given_as_jax_arrays_are_compared_like_numpy_ones():
    # Only views that read their rows on access (no __array__) skip the
    # comparison; a jax.numpy copy of the arrays is compared.
    x, y = helpers.data(10, shape=(8, 8, 3))
    x[7], y[7] = x[2], y[2]
    with pytest.raises(ValueError, match="repeat an earlier row"):
        image_views.AugmentedImages(jnp.asarray(x), jnp.asarray(y), 2, "cifar")
    assert len(image_views.AugmentedImages(jnp.asarray(x[:7]), y[:7], 2, "cifar")) == 7
