import math

import pytest

from common.config import OptimConfig
from common.schedule import lr_at, lr_table

OPT = OptimConfig(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=110)


def test_warmup_starts_above_zero_and_reaches_peak():
    assert lr_at(0, OPT) == pytest.approx(6e-5)  # max_lr * 1/10: step 0 already trains
    assert lr_at(4, OPT) == pytest.approx(3e-4)
    assert lr_at(9, OPT) == pytest.approx(6e-4)
    assert lr_at(10, OPT) == pytest.approx(6e-4)


def test_cosine_midpoint_end_and_after():
    assert lr_at(60, OPT) == pytest.approx(6e-5 + 0.5 * (6e-4 - 6e-5))
    assert lr_at(110, OPT) == pytest.approx(6e-5)
    assert lr_at(5000, OPT) == 6e-5
    steps = [lr_at(s, OPT) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_table_equals_function():
    table = lr_table(OPT)
    assert len(table) == 111
    assert all(table[s] == lr_at(s, OPT) for s in range(111))
    assert math.isclose(table[-1], OPT.min_lr)
