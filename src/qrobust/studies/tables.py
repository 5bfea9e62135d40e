"""Formatting shared by the studies' reports: one way to print a mean +- std cell."""

from __future__ import annotations

import math
from typing import Any


def mean_of(cell: Any) -> float:
    """The mean of a ``mean_std`` cell, or the number itself (NaN for None)."""
    if isinstance(cell, dict) and "mean" in cell:
        return float(cell["mean"])
    return float("nan") if cell is None else float(cell)


def fmt(cell: Any, seeds: int, percent: bool = True, spec: str = ".3f", signed: bool = False) -> str:
    """``"84.1 ± 0.6"`` (percent) or ``"0.012 ± 0.003"``; the std only when ``seeds > 1``; ``n/a`` for NaN."""
    mean = mean_of(cell)
    std = float(cell["std"]) if isinstance(cell, dict) and "std" in cell else 0.0
    if math.isnan(mean):
        return "n/a"
    sign = "+" if signed else ""
    if percent:
        return f"{100 * mean:{sign}.1f}" + (f" ± {100 * std:.1f}" if seeds > 1 else "")
    return f"{mean:{sign}{spec}}" + (f" ± {std:{spec}}" if seeds > 1 else "")
