"""Argument checks shared by the interventions."""

from __future__ import annotations

from typing import Any

from topomon._validate import check_number

__all__ = ["check_weight"]


def check_weight(weight: Any) -> float:
    """A regulariser weight as a float.

    Raises:
        TypeError: for a non-number (bools included).
        ValueError: for a negative or non-finite weight.
    """
    return check_number("weight", weight, 0, type_error=TypeError, plain=True, quote=False)
