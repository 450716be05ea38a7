"""Checks of scalar arguments shared by every role: one message per kind of bad value.

Each check returns the value as the right type or raises `tracin.ConfigError` naming the argument,
the value, what was expected, and an example that works.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np

from tracin._errors import ConfigError

__all__ = ["integer"]


def integer(
    name: str,
    value: Any,
    minimum: int = 1,
    example: int | None = None,
    *,
    maximum: int | None = None,
    of: str = "",
) -> int:
    """``value`` as an ``int`` (Python or NumPy integers) in ``[minimum, maximum]``.

    Args:
        name: the argument's name as the user typed it, e.g. ``"k"`` or ``"--top"``.
        value: what the user gave.
        minimum: the smallest accepted value.
        example: a value that works, shown in the message (default: ``minimum``).
        maximum: the largest accepted value, if any.
        of: what ``maximum`` counts, e.g. ``" training rows"`` (shown after the bound).

    Raises:
        ConfigError: a float, bool, string or other non-integer type, or a value out of range.
    """
    example = minimum if example is None else example
    try:
        if isinstance(value, bool | np.bool_):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        whole = isinstance(value, float | np.floating) and float(value).is_integer()
        ok = whole and value >= minimum and (maximum is None or value <= maximum)
        hint = f"{name}={int(value)}" if ok else f"{name}={example}"
        raise ConfigError(
            f"{name}={value!r} ({type(value).__name__}) must be an integer, e.g. {hint}"
        ) from None
    if maximum is not None and not minimum <= number <= maximum:
        the = " the" if of else ""
        raise ConfigError(
            f"{name}={value!r} must be an integer between {minimum} and{the} {maximum}{of}"
        )
    if number < minimum:
        what = {1: "a positive integer", 0: "an integer >= 0"}.get(
            minimum, f"an integer >= {minimum}"
        )
        raise ConfigError(f"{name}={value!r} must be {what}, e.g. {name}={example}")
    return number
