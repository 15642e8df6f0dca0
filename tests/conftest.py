import os
import warnings

import pytest

# Two cores: keep each process to one thread so multi-process tests do not oversubscribe.
os.environ.setdefault("OMP_NUM_THREADS", "1")
warnings.filterwarnings("ignore", module="megatron")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A small, briefly warmed-up base (seconds, not the demo's minutes)."""
    out = str(tmp_path_factory.mktemp("tiny_base"))
    from tests.tiny import prepare_base

    prepare_base(out)
    return out
