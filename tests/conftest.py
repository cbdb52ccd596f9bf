"""Fixtures and helpers shared by the test modules, and the markers the suite uses.

``slow`` marks tests of more than about two seconds (training runs, worker processes), so
``pytest -m "not slow"`` is the quick loop; ``cuda`` marks tests that need a GPU, skipped without one.
"""
import pytest
import torch

from neurosens import data
from neurosens.models import build_model

CUDA = torch.cuda.is_available()

#: A small CNN for 8x8 digits: a few epochs train in seconds on one core.
SPEC = {"name": "small-cnn", "num_classes": 10, "in_channels": 1, "input_size": 8, "width": 8, "hidden": 32}


def digits8(limit=None):
    """The 8x8 digits: the training split (a seeded subset of ``limit`` images if given) and the test split."""
    train, test = data.digits(True, size=8), data.digits(False, size=8)
    return (train.subset(limit) if limit else train), test


def fresh_model(seed=0, dtype=torch.float32):
    """The :data:`SPEC` model with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return build_model(**SPEC).to(dtype)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine makes more threads far slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and params.params.get("device") == "cuda":
            item.add_marker(pytest.mark.cuda)
        if item.get_closest_marker("cuda") is not None and not CUDA:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
