"""The checks every config and argument validation shares: each failure is a ValueError naming the field
and saying what to do."""

from __future__ import annotations

import numpy as np


def is_int(x: object) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def need(ok: bool, field: str, value: object, fix: str) -> None:
    """Raises `ValueError("config.<field>=<value> is invalid: <fix>")` unless `ok`."""
    if not ok:
        raise ValueError(f"config.{field}={value!r} is invalid: {fix}")


def fail(field: str, problem: str, fix: str) -> None:
    """Raises `ValueError("config.<field>: <problem>. Fix: <fix>.")`."""
    raise ValueError(f"config.{field}: {problem}. Fix: {fix}.")
