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


def trained_on_digits(make_model, passes, lr=3e-3):
    """The model ``make_model()`` builds after seeding 0, trained by Adam on the 8x8 digits for
    ``passes`` shuffled passes in batches of 64 (the global RNG left as it was), in eval mode, with
    the digits test split."""
    import torch.nn.functional as F

    with torch.random.fork_rng():
        torch.manual_seed(0)
        x, y = data.digits(True, size=8).tensors()
        model = make_model()
        opt = torch.optim.Adam(model.parameters(), lr)
        for _ in range(passes):
            for idx in torch.randperm(len(y)).split(64):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
    xt, yt = data.digits(False, size=8).tensors()
    return model.eval(), xt, yt


def outputs_by_hooks(model, x, names):
    """``model(x)`` and the outputs of the named layers, taken by plain forward hooks (independent of
    neurosens.capture)."""
    found = {}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, i, out, n=n: found.__setitem__(n, out)) for n in names]
    try:
        result = model(x)
    finally:
        for h in handles:
            h.remove()
    return result, found


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
