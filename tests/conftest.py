"""Shared fixtures: tiny models and tiny synthetic data; no downloads."""

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def synthetic():
    from qrobust.data import load_dataset

    return load_dataset("synthetic")
