"""Shared set-up of the active-learning tests: one torch thread (small real trainings, deterministic and not
competing with each other for the CI machine's two cores)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
