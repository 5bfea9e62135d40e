"""Seed aggregation shared by the studies: mean and sample std per leaf, NaN seeds left out and counted,
nesting kept, non-numbers taken from the first seed; plus a check helper the study tests reuse."""

import math
import statistics

import pytest

from qrobust.experiment import aggregate_seeds, is_stat, mean_std


def test_mean_std_is_the_sample_statistic():
    cell = mean_std([0.5, 0.7, 0.9])
    assert cell["mean"] == pytest.approx(0.7) and cell["n"] == 3
    assert cell["std"] == pytest.approx(0.2)  # sqrt(((-.2)^2 + 0 + .2^2) / 2)
    assert mean_std([0.3]) == {"mean": 0.3, "std": 0.0, "n": 1}


def test_nan_seeds_are_left_out_and_counted():
    cell = mean_std([0.2, float("nan"), 0.4])
    assert cell["mean"] == pytest.approx(0.3) and cell["n"] == 2
    empty = mean_std([float("nan"), None])
    assert math.isnan(empty["mean"]) and math.isnan(empty["std"]) and empty["n"] == 0


def test_aggregate_keeps_nesting_and_averages_lists_when_asked():
    seeds = [
        {"acc": {"8": 0.9, "4": 0.8}, "curve": [0.1, 0.2], "label": "a", "ok": True, "bits": [8, 4]},
        {"acc": {"8": 0.7, "4": 0.6}, "curve": [0.3, 0.4], "label": "b", "ok": False, "bits": [8, 4]},
    ]
    agg = aggregate_seeds(seeds)
    assert agg["acc"]["8"]["mean"] == pytest.approx(0.8) and agg["acc"]["4"]["mean"] == pytest.approx(0.7)
    assert [c["mean"] for c in agg["curve"]] == pytest.approx([0.2, 0.3])
    assert agg["label"] == "a" and agg["ok"] is True  # bools are not averaged
    kept = aggregate_seeds(seeds, average_lists=False)
    assert kept["curve"] == [0.1, 0.2] and is_stat(kept["acc"]["8"])


def test_lists_of_different_lengths_are_not_zipped():
    agg = aggregate_seeds([{"h": [1.0, 2.0]}, {"h": [3.0]}])
    assert agg["h"] == [1.0, 2.0]


def test_the_checker_catches_a_wrong_mean(seed_statistics):
    per_seed = [{"a": 0.2}, {"a": 0.4}]
    good = aggregate_seeds(per_seed)
    assert seed_statistics(good, per_seed) == 1
    bad = {"a": {"mean": 0.35, "std": good["a"]["std"], "n": 2}}
    with pytest.raises(AssertionError):
        seed_statistics(bad, per_seed)


def test_paired_differences_pair_by_seed_not_by_position():
    """Two victims' per-seed values are compared seed for seed (the shared seeds only, whatever the dict
    order), with the sample std of the differences; no shared seed gives None, not a zero gain."""
    from qrobust.studies.tables import paired_differences

    diff = paired_differences({2: 0.5, 0: 0.9, 1: 0.7}, {1: 0.6, 0: 0.8, 3: 0.1})
    assert diff["seeds"] == [0, 1]
    assert diff["values"] == pytest.approx([0.1, 0.1])
    assert diff["mean"] == pytest.approx(0.1) and diff["std"] == pytest.approx(0.0, abs=1e-12)
    diff = paired_differences({0: 3.0, 1: 1.0}, {0: 1.0, 1: 2.0})
    assert diff["values"] == [2.0, -1.0] and diff["mean"] == 0.5
    assert diff["std"] == pytest.approx(statistics.stdev([2.0, -1.0]))
    assert paired_differences({0: 1.0}, {0: 0.25}) == {"seeds": [0], "values": [0.75], "mean": 0.75, "std": 0.0}
    assert paired_differences({0: 1.0}, {1: 1.0}) is None
