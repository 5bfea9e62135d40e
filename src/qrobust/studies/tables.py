"""Shared by the studies' reports: one way to print a mean +- std cell, one way to pair two victims by seed."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from qrobust.experiment.aggregate import mean_std


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


def paired_differences(reference: Mapping[Any, float], other: Mapping[Any, float]) -> dict | None:
    """``reference[s] - other[s]`` for every seed ``s`` both have (sorted), with their mean and sample std
    (0.0 with one seed; :func:`~qrobust.experiment.aggregate.mean_std`): the paired comparison of two
    victims trained and attacked with the same seeds. None when no seed is shared."""
    seeds = sorted(set(reference) & set(other))
    if not seeds:
        return None
    values = [reference[s] - other[s] for s in seeds]
    stats = mean_std(values)
    return {"seeds": seeds, "values": values, "mean": stats["mean"], "std": stats["std"]}
