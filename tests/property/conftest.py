"""Property tests share the 2-core CI box with other processes: one torch thread each (OpenMP
spinning between concurrent processes costs more than threads win at these tiny sizes). Module
scope, not function scope: hypothesis runs many examples per test function."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
