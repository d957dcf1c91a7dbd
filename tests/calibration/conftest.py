import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of many small ops, whose thread hand-offs cost more than the ops
    themselves (ten times more on a shared, loaded CPU)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
