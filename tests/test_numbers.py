"""common.numbers: numbers read from JSON, where Python's bool is an int."""
from __future__ import annotations

import json

from common.numbers import is_finite_number, is_int


def test_is_int_refuses_bools_and_floats():
    values = json.loads('[3, 0, -2, true, false, 3.0, "3", null]')
    assert [is_int(v) for v in values] == [True, True, True, False, False, False, False, False]


def test_is_finite_number_refuses_bools_and_non_finite_values():
    values = [1, -2.5, 0.0, True, float("nan"), float("inf"), -float("inf"), "1", None, json.loads("1" + "0" * 400)]
    assert [is_finite_number(v) for v in values] == [True, True, True] + [False] * 7
