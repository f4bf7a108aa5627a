"""Fixtures shared by the test modules (their helpers, models, data and dense references are
in tests/helpers.py: ``from helpers import ...``)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from hypothesis import configuration as hypothesis_configuration
from torch import nn

# The test models are tiny: one intra-op thread avoids thread-pool overhead and makes the
# suite's timings independent of how many cores the machine has.
torch.set_num_threads(1)

# Hypothesis keeps its cache in ./.hypothesis by default: keep it out of the checkout.
hypothesis_configuration.set_hypothesis_home_dir(tempfile.mkdtemp(prefix="curvlab-hypothesis-"))


@pytest.fixture
def digits_logreg():
    """Softmax regression on scikit-learn's digits (float64): model, loss, (x, y)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Linear(64, 10).to(torch.float64)
    return model, nn.CrossEntropyLoss(), (x, y)


# ---------------------------------------------------------------------- the case zoo
@pytest.fixture(scope="session")
def zoo_cache() -> dict:
    """Session-wide cache of the case zoo's references (tests/cases.py, tests/references.py),
    keyed by what they depend on; each reference is built once and shared by all backends."""
    return {}

