import os

# The suite runs tiny models, whose many small ops cost less than handing them between threads: one
# intra-op thread per test process, and for the processes tests start (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


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


@pytest.fixture
def wan_kit():
    """Builders of a tiny Wan transformer and its inputs (skips without diffusers; ``rel_helpers``)."""
    import types

    import rel_helpers as h

    pytest.importorskip("diffusers")
    return types.SimpleNamespace(EXACT=h.EXACT, SPARSE=h.SPARSE, wan=h.tiny_wan, wan_inputs=h.wan_inputs, run=h.run)
