"""Shared fixtures: tiny models and tiny synthetic data; no downloads."""

import math

import pytest
import torch
from torch import nn

from qrobust.experiment import is_stat

torch.set_num_threads(min(2, torch.get_num_threads()))


class PerSample(nn.Module):
    """Runs ``net`` one sample at a time, so batched and per-sample evaluations agree bit for bit.

    A test that compares numbers computed with different batch sizes (e.g. "independent of batching")
    wraps its model in this: every image then meets the same kernels on the same shapes whatever the
    batching, and an exact comparison is sound on any CPU. Without it, a GEMM/conv kernel may sum in
    another order for another row count and a near-tied argmax can flip.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net(xi.unsqueeze(0)) for xi in x])


@pytest.fixture
def per_sample():
    """The :class:`PerSample` wrapper class."""
    return PerSample


@pytest.fixture(scope="session")
def synthetic():
    from qrobust.data import load_dataset

    return load_dataset("synthetic")


def assert_seed_statistics(agg, per_seed, path=()):
    """Every ``mean_std`` leaf of ``agg`` equals the statistic of the per-seed leaves at the same path.
    Returns how many leaves were checked (a caller asserts it is > 0, so the check cannot pass vacuously)."""
    if is_stat(agg):
        values = [float(s) for s in per_seed if not math.isnan(float(s))]
        assert agg["n"] == len(values), path
        if values:
            mean = sum(values) / len(values)
            assert agg["mean"] == pytest.approx(mean, abs=1e-9), path
            if len(values) > 1:
                std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
                assert agg["std"] == pytest.approx(std, abs=1e-9), path
        return 1
    checked = 0
    if isinstance(agg, dict):
        for key, value in agg.items():
            subs = [s[key] for s in per_seed if isinstance(s, dict) and key in s]
            if subs:
                checked += assert_seed_statistics(value, subs, (*path, key))
    elif isinstance(agg, list):
        for i, value in enumerate(agg):
            subs = [s[i] for s in per_seed if isinstance(s, list) and len(s) > i]
            if subs:
                checked += assert_seed_statistics(value, subs, (*path, i))
    return checked


@pytest.fixture
def seed_statistics():
    """:func:`assert_seed_statistics`, for the study tests that run two seeds."""
    return assert_seed_statistics


@pytest.fixture(scope="session")
def ray_executor():
    """One local Ray of 2 CPUs for the whole test session (starting one costs seconds)."""
    pytest.importorskip("ray")
    from qrobust.experiment import make_executor

    executor = make_executor("ray", num_cpus=2)
    yield executor
    executor.close()
