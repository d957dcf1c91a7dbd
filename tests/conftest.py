import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng():
    """A fresh generator per test (seeded from the OS, printed on failure through pytest's repr)."""
    seed = torch.seed() % (2**31)
    print(f"random seed: {seed}")  # shown by pytest when the test fails
    return torch.Generator().manual_seed(seed)
