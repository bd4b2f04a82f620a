"""Fixtures for the loader tests; the checkpoint builders live in ckpt_builders.py."""

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
