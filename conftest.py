"""Fixtures for both test directories (tests/, parity/)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Test models are tiny: a second torch thread gains nothing, and on a busy 2-core machine
    every op waits for it (measured: 100x slower with another process running)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
