"""The benches set torch's thread count (--threads): each test gets the count back."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
