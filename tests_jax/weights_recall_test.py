"""Weights a callback sets or copies during a JAX fit bring their ledger (review)."""

import _jax_helpers as helpers
import keras
import pytest

from tan_keras.jax_dp import weights_recall

ROWS = 16


def _private(seed, **dp):
    keras.utils.set_random_seed(seed)
    return helpers.private(helpers.dense_model(), ROWS, batch=ROWS, noise_multiplier=0.5, **dp)


class _WarmStart(keras.callbacks.Callback):
    """Sets another model's weights when training (or an epoch) begins."""

    def __init__(self, weights, hook):
        super().__init__()
        self._weights, self._hook = weights, hook

    def on_train_begin(self, logs=None):
        if self._hook == "on_train_begin":
            self.model.set_weights(self._weights)

    def on_epoch_begin(self, epoch, logs=None):
        if self._hook == "on_epoch_begin" and epoch == 1:
            self.model.set_weights(self._weights)


@pytest.mark.parametrize("recall", [True, False])
@pytest.mark.parametrize("hook", ["on_train_begin", "on_epoch_begin"])
def test_weights_set_by_a_callback_bring_the_updates_they_went_through(hook, recall, monkeypatch):
    # The power check (recall=False): without the look after the user's
    # callbacks, the warm-started model counts only its own updates.
    if not recall:
        monkeypatch.setattr(weights_recall.RecallSetWeights, "_look", lambda self, **k: None)
    x, y = helpers.data(ROWS)
    source = _private(0)
    source.fit(x, y, epochs=5, verbose=0)
    target = _private(1)
    target.fit(x, y, epochs=2, verbose=0, callbacks=[_WarmStart(source.get_weights(), hook)])
    # Its own 2 updates and the source's 5 (on_epoch_begin: the first of its
    # own was released before the copy replaced it: counted too).
    assert (int(target.dp_steps) == 7) == recall, int(target.dp_steps)


class _KeepsEveryUpdate(keras.callbacks.Callback):
    """Copies the weights after every update (a user's own best-weights keeper)."""

    def __init__(self):
        super().__init__()
        self.kept = []

    def on_train_batch_end(self, batch, logs=None):
        self.kept.append(self.model.get_weights())


@pytest.mark.parametrize("remember", [True, False])
def test_weights_copied_between_updates_are_recognised_in_another_model(remember, monkeypatch):
    # The power check (remember=False): only the values the fit ends with
    # are remembered, and a copy of an earlier update's comes without history.
    if not remember:
        monkeypatch.setattr(weights_recall.RememberUpdates, "_remember", lambda self: None)
    x, y = helpers.data(ROWS)
    model = _private(0)
    keeper = _KeepsEveryUpdate()
    model.fit(x, y, epochs=3, verbose=0, callbacks=[keeper])
    copy = helpers.dense_model()
    copy.set_weights(keeper.kept[1])  # after the 2nd of 3 updates
    reused = helpers.private(copy, ROWS, batch=ROWS, noise_multiplier=0.5)
    assert (int(reused.dp_steps) == 2) == remember, int(reused.dp_steps)
