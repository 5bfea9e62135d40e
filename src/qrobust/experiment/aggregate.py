"""Aggregation over seeds: one implementation for every study."""

from __future__ import annotations

import math
from typing import Any


def mean_std(values: list[Any]) -> dict:
    """``{"mean", "std", "n"}`` over the finite values: sample std (n - 1), 0 for one value, NaN for none.

    A seed whose value is NaN (e.g. an ASR with no clean-correct image) is left out of the mean and std;
    ``n`` says how many seeds the cell rests on, so a table can say when it is fewer than asked."""
    good = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not good:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    mean = sum(good) / len(good)
    std = math.sqrt(sum((v - mean) ** 2 for v in good) / (len(good) - 1)) if len(good) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(good)}


def aggregate_seeds(values: list[Any], average_lists: bool = True) -> Any:
    """Per-seed results (same nesting) -> that nesting with every number replaced by :func:`mean_std`.

    Dicts recurse over the first seed's keys (a key missing in some seeds is averaged over the rest);
    lists of equal length recurse element-wise when ``average_lists`` (else the first seed's list is kept,
    as for lists that describe the run rather than measure it); anything else (str, bool, None, lists of
    different lengths) is taken from the first seed."""
    first = values[0]
    if isinstance(first, dict):
        return {k: aggregate_seeds([v[k] for v in values if k in v], average_lists) for k in first}
    if (isinstance(first, list) and average_lists and all(isinstance(v, list) for v in values)
            and len({len(v) for v in values}) == 1):
        return [aggregate_seeds([v[i] for v in values], average_lists) for i in range(len(first))]
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return mean_std(values)
    return first


def is_stat(cell: Any) -> bool:
    """True for a :func:`mean_std` leaf."""
    return isinstance(cell, dict) and "mean" in cell and "std" in cell
