"""The real MNIST files (`make test` fetches them): sizes, label counts and pixel statistics.

The data root is $NEUROSENS_DATA, else the repository's data/ folder, wherever pytest runs from.
Missing files skip these tests on a developer's machine, but fail them under CI (which fetches
them first) or once `make test` has marked them fetched (data/mnist/.fetched)."""
import os
from pathlib import Path

import pytest
import torch

from neurosens import data

ROOT = Path(os.environ.get(data.ROOT_ENV) or Path(__file__).resolve().parent.parent / "data")
MUST_EXIST = os.environ.get("CI", "").lower() in ("1", "true", "yes") or (ROOT / "mnist" / ".fetched").exists()

try:
    TRAIN, TEST = data.mnist(train=True, root=ROOT), data.mnist(train=False, root=ROOT)
except FileNotFoundError as missing:
    if MUST_EXIST:
        pytest.fail(f"MNIST should be under {ROOT} but is not: {missing}", pytrace=False)
    pytest.skip(f"MNIST is not fetched ({missing}); run `neurosens data fetch mnist`", allow_module_level=True)

# Published per-class counts of the MNIST training and test sets.
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_sizes_and_label_counts():
    assert len(TRAIN) == 60000 and len(TEST) == 10000
    assert torch.bincount(TRAIN.labels, minlength=10).tolist() == TRAIN_COUNTS
    assert torch.bincount(TEST.labels, minlength=10).tolist() == TEST_COUNTS


def test_pixels_are_in_unit_range_with_the_known_mean_and_std():
    first = torch.stack([TRAIN[i][0] for i in range(100)])
    assert first.shape[1:] == (1, 28, 28) and first.min() >= 0 and first.max() <= 1
    torch.testing.assert_close(first, TRAIN.images[:100].float() / 255)
    x = TRAIN.images.float() / 255
    assert x.mean().item() == pytest.approx(0.1307, abs=0.002)
    assert x.std().item() == pytest.approx(0.3081, abs=0.002)
    assert data.stats("mnist") == ((pytest.approx(0.1307, abs=1e-3),), (pytest.approx(0.3081, abs=1e-3),))
