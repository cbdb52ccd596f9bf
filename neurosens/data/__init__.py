"""Data sets read from local files, as tensors of pixels in [0, 1].

:mod:`~neurosens.data.datasets` holds the data sets and their loaders, :mod:`~neurosens.data.files`
the data root, the pinned hashes of the files read, the IDX reader and the CIFAR batch reader, and
:mod:`~neurosens.data.fetching` the only code that touches the network (``neurosens data fetch``).

The data root is ``$NEUROSENS_DATA`` when set, else ``data/`` under the working directory; every
loader also takes ``root=``.
"""
from .datasets import (DATASETS, STATS, ImageDataset, cifar10, digits, fashion_mnist, idx_dataset, load, make_loader,
                       mnist, stats, synthetic)
from .fetching import fetch
from .files import PINNED_MD5, ROOT_ENV, SOURCES, ChecksumError, data_root, read_cifar_batch, read_idx, sha256, verify

__all__ = ["DATASETS", "PINNED_MD5", "ROOT_ENV", "SOURCES", "STATS", "ChecksumError", "ImageDataset", "cifar10", "data_root", "digits",
           "fashion_mnist", "fetch", "idx_dataset", "load", "make_loader", "mnist", "read_cifar_batch", "read_idx", "sha256", "stats",
           "synthetic", "verify"]
