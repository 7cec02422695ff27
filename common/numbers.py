"""Type checks for numbers read from JSON files and records, where bool is an int in Python: a `true` in a
file is a broken value, not 1."""
from __future__ import annotations

import math
from typing import Any


def is_int(v: Any) -> bool:
    """An integer, not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_finite_number(v: Any) -> bool:
    """An int or float that is finite as a float, not a bool (JSON's integers have no size limit)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False
