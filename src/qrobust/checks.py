"""Validators for user-given settings: each raises a one-line :class:`~qrobust.errors.ConfigError`.

Shared by the attacks (white-box, score-based, extraction) and their config objects, so that a bad
setting reads the same wherever it is given::

    check_int("steps", 0, 1)          -> ConfigError: steps must be an integer >= 1, got 0
    check_positive("lr", -0.1)        -> ConfigError: lr must be a number > 0, got -0.1
    check_choice("schedule", "x", ("cosine", "none"))
                                      -> ConfigError: schedule must be one of cosine, none, got 'x'
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

from qrobust.errors import ConfigError


def check_int(name: str, value: Any, low: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= low``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool) ``> 0``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ConfigError(f"{name} must be a number > 0, got {value!r}")
    return float(value)


def check_non_negative(name: str, value: Any) -> float:
    """``value`` as a ``float`` if it is a real number (not a bool) ``>= 0``; else :class:`ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ConfigError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``; else :class:`ConfigError` listing them."""
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is ``True`` or ``False``; else :class:`ConfigError`."""
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    return value


__all__ = ["check_bool", "check_choice", "check_int", "check_non_negative", "check_positive"]
