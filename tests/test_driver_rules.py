"""FakeDriver rejects what the native driver rejects: the same list of bad batches as
test_driver_errors.py, the same status and message, and the live sequence's logits unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from driver_helpers import build_batch
from driver_rules import BAD_BATCHES, DECODE, NAN_TOKEN, PAGE, PARAMS, POISONED_ROW_ERROR, PROMPT, Req, poisoned_batch

from pie_local.driver import DriverError, ModelDriver
from pie_local.driver.fake import FakeDriver


@pytest.fixture(scope="module")
def live():
    drv = FakeDriver(PARAMS, n_vocab=512)  # token ids up to 309 appear in the cases
    drv.forward(build_batch([Req(PROMPT, [0, 1, 2], len(PROMPT))], PAGE))
    return drv, drv.forward(build_batch([DECODE], PAGE)).logits


@pytest.mark.parametrize("case", list(BAD_BATCHES))
def test_fake_driver_rejects_the_native_drivers_bad_batches(live, case: str) -> None:
    drv, baseline = live
    make, fragment = BAD_BATCHES[case]
    with pytest.raises(DriverError) as err:
        drv.forward(make(drv.info.n_vocab))
    assert err.value.status == "invalid_argument", err.value
    assert fragment in err.value.message, err.value.message
    np.testing.assert_array_equal(drv.forward(build_batch([DECODE], PAGE)).logits, baseline)


def test_fake_driver_is_a_model_driver() -> None:
    assert isinstance(FakeDriver(), ModelDriver)


def test_fake_driver_fails_a_row_that_cannot_be_sampled_alone() -> None:
    drv = FakeDriver(PARAMS, n_vocab=512, nan_tokens=[NAN_TOKEN])
    res = drv.forward(poisoned_batch())
    assert res.tokens[0] == -1 and res.row_errors[0].status == "invalid_argument"
    assert res.row_errors[0].message == POISONED_ROW_ERROR
    assert res.row_errors[1:] == [None, None] and (res.tokens[1:] >= 0).all()
    with pytest.raises(DriverError) as err:  # unless asked, such a row fails the call
        drv.forward(poisoned_batch(rows_fail_alone=False))
    assert err.value.message == POISONED_ROW_ERROR
