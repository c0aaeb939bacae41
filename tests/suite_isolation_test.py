"""The suite's own isolation: a module fixture sees nothing an earlier test remembered.

CI once failed because a module-scoped fixture (built before any
function-scoped fixture) made a private model while the worker still
remembered the previous test's weight values (tests/conftest.py).
"""

import pytest

from tan_keras.keras_dp import ledger


@pytest.fixture(scope="module")
def _remembered_when_the_module_fixture_was_built():
    return len(ledger._REMEMBERED)


def test_a_test_that_leaves_a_remembered_value():
    ledger._REMEMBERED[12345] = {}


def test_a_module_fixture_built_after_it_sees_nothing(
    _remembered_when_the_module_fixture_was_built,
):
    assert _remembered_when_the_module_fixture_was_built == 0
