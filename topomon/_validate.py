"""Argument checks shared by the package: one wording for every "must be" error (STYLE.md 6).

Each check returns the value as a plain Python type, or raises ``error`` (``ValueError`` unless the
caller names its own, such as :class:`topomon.config.ConfigError`) with the message
``"`name` must be <what is allowed>, got <value!r>"``. ``expected`` replaces the
``<what is allowed>`` part where a module words it its own way; ``quote=False`` drops the
backticks; ``type_error`` raises another type for a value of the wrong type (a float for an int);
``plain=True`` accepts only Python ``int`` / ``float``, not numpy scalars (for values that are
stored and serialised, such as config fields).

Example:
    >>> check_int("every_n_steps", 4, 1)
    4
    >>> check_int("every_n_steps", 0, 1)
    Traceback (most recent call last):
    ...
    ValueError: `every_n_steps` must be an int >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = [
    "is_int",
    "is_number",
    "check_int",
    "check_weight",
    "check_optional_int",
    "check_number",
    "check_choice",
    "check_str",
]


def is_int(value: Any, *, plain: bool = False) -> bool:
    """Whether ``value`` is an integer: a Python int or (unless ``plain``) a numpy integer; never a bool.

    Args:
        value: anything.
        plain: accept only Python ``int``.

    Returns:
        True for an integer.
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if plain else isinstance(value, numbers.Integral)


def is_number(value: Any, *, plain: bool = False) -> bool:
    """Whether ``value`` is a real number (int or float, numpy scalars unless ``plain``); never a bool.

    Args:
        value: anything.
        plain: accept only Python ``int`` and ``float``.

    Returns:
        True for a real number (NaN and inf included).
    """
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if plain else isinstance(value, numbers.Real)


def _fail(error: type[Exception], name: str, value: Any, expected: str, quote: bool) -> Exception:
    label = f"`{name}`" if quote else name
    return error(f"{label} must be {expected}, got {value!r}")


def check_int(
    name: str,
    value: Any,
    low: int,
    *,
    high: int | None = None,
    error: type[Exception] = ValueError,
    type_error: type[Exception] | None = None,
    plain: bool = False,
    expected: str | None = None,
    quote: bool = True,
) -> int:
    """An integer in ``[low, high]``.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low: smallest value allowed.
        high: largest value allowed, or None.
        error: exception raised (also for a wrong type unless ``type_error`` is given).
        type_error: exception raised for a non-integer.
        plain: accept only Python ``int`` (not numpy integers).
        expected: wording of what is allowed (default ``"an int >= low"`` / ``"an int in [low, high]"``).
        quote: put the name in backticks.

    Returns:
        ``int(value)``.

    Raises:
        Exception: ``error`` (or ``type_error``) naming the argument, the allowed values and the value.

    Example:
        >>> check_int("window", 5, 2, high=10)
        5
    """
    if expected is None:
        expected = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if not is_int(value, plain=plain):
        raise _fail(type_error or error, name, value, expected, quote)
    if value < low or (high is not None and value > high):
        raise _fail(error, name, value, expected, quote)
    return int(value)


def check_optional_int(
    name: str,
    value: Any,
    low: int,
    *,
    error: type[Exception] = ValueError,
    expected: str | None = None,
    quote: bool = True,
) -> int | None:
    """None, or an integer >= ``low`` (see :func:`check_int`).

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low: smallest value allowed.
        error: exception raised.
        expected: wording of what is allowed (default ``"an int >= low or None"``).
        quote: put the name in backticks.

    Returns:
        None or ``int(value)``.

    Raises:
        Exception: ``error`` naming the argument, the allowed values and the value.

    Example:
        >>> check_optional_int("pca_dim", None, 1) is None
        True
    """
    if value is None:
        return None
    return check_int(
        name, value, low, error=error, expected=expected or f"an int >= {low} or None", quote=quote
    )


def check_number(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    finite: bool = True,
    error: type[Exception] = ValueError,
    type_error: type[Exception] | None = None,
    plain: bool = False,
    expected: str | None = None,
    quote: bool = True,
) -> float:
    """A real number, not NaN, within ``low`` (inclusive unless ``low_open``) and ``high`` (inclusive).

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        low: lower bound, or None.
        high: upper bound, or None.
        low_open: the lower bound is excluded (``> low``).
        finite: reject +-inf.
        error: exception raised (also for a wrong type unless ``type_error`` is given).
        type_error: exception raised for a non-number.
        plain: accept only Python ``int`` and ``float`` (not numpy scalars).
        expected: wording of what is allowed (default built from the bounds:
            ``"a finite number > 0"``, ``"a number in [0, 1]"``).
        quote: put the name in backticks.

    Returns:
        ``float(value)``.

    Raises:
        Exception: ``error`` (or ``type_error``) naming the argument, the allowed values and the value.

    Example:
        >>> check_number("threshold", 0.15, 0, low_open=True)
        0.15
    """
    if expected is None:
        if low is not None and high is not None:
            expected = f"a number in {'(' if low_open else '['}{low}, {high}]"
        else:
            expected = "a finite number" if finite else "a number"
            if low is not None:
                expected += f" {'>' if low_open else '>='} {low}"
            if high is not None:
                expected += f" <= {high}"
    if not is_number(value, plain=plain):
        raise _fail(type_error or error, name, value, expected, quote)
    v = float(value)
    if (
        math.isnan(v)
        or (finite and not math.isfinite(v))
        or (low is not None and (v <= low if low_open else v < low))
        or (high is not None and v > high)
    ):
        raise _fail(error, name, value, expected, quote)
    return v


def check_choice(
    name: str, value: Any, allowed: Sequence[str], *, error: type[Exception] = ValueError, quote: bool = True
) -> str:
    """One of ``allowed``.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        allowed: the valid values.
        error: exception raised.
        quote: put the name in backticks.

    Returns:
        ``str(value)``.

    Raises:
        Exception: ``error`` naming the argument, the valid values and the value.

    Example:
        >>> check_choice("direction", "drop", ("drop", "rise"))
        'drop'
    """
    if value not in allowed:
        raise _fail(error, name, value, f"one of {list(allowed)}", quote)
    return str(value)


def check_str(
    name: str,
    value: Any,
    *,
    empty: bool = False,
    error: type[Exception] = ValueError,
    quote: bool = True,
) -> str:
    """A string, non-empty unless ``empty``.

    Args:
        name: the argument's name, for the message.
        value: the value to check.
        empty: allow ``""``.
        error: exception raised.
        quote: put the name in backticks.

    Returns:
        ``value``.

    Raises:
        Exception: ``error`` naming the argument and the value.

    Example:
        >>> check_str("metric", "rankme")
        'rankme'
    """
    if not isinstance(value, str) or not (empty or value):
        raise _fail(error, name, value, "a string" if empty else "a non-empty string", quote)
    return value


def check_weight(weight: Any) -> float:
    """A regulariser weight as a float: ``"weight must be ..."``, finite and ``>= 0``.

    Raises:
        TypeError: for a non-number (bools included).
        ValueError: for a negative or non-finite weight.
    """
    return check_number("weight", weight, 0, type_error=TypeError, plain=True, quote=False)
