"""Data sets as tensors of pixels in [0, 1], read from local files, and their loaders.

Images are kept as uint8 and turned into float32 in [0, 1] per sample; any normalization belongs
to the model (see :class:`neurosens.models.Normalize`), so attack budgets are in pixel units.
"""
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from .files import PINNED_MD5, SOURCES, data_root, read_cifar_batch, read_idx, verify, verify_pinned

#: Per-data-set channel statistics, for the model's Normalize layer.
STATS = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "digits": ((0.3070,), (0.3750,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

_SPLITS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
           "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

class ImageDataset(Dataset):
    """Images ``[N, C, H, W]`` (uint8 or float in [0, 1]) and int64 labels; items are
    ``(float32 image in [0, 1], label)``."""

    def __init__(self, images, labels, num_classes=None, name="images"):
        images, labels = torch.as_tensor(images), torch.as_tensor(labels, dtype=torch.int64)
        if images.dim() != 4:
            raise ValueError(f"{name}: images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} labels")
        if images.is_floating_point() and len(images) and (images.min() < 0 or images.max() > 1):
            raise ValueError(f"{name}: float images must lie in [0, 1]")
        self.images, self.labels, self.name = images, labels, name
        self.num_classes = int(num_classes if num_classes is not None else labels.max().item() + 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.pixels(self.images[i]), self.labels[i]

    @staticmethod
    def pixels(images):
        return images.float().div_(255) if images.dtype == torch.uint8 else images.float()

    @property
    def shape(self):
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def tensors(self, limit=None):
        """All (or the first ``limit``) images as float32 in [0, 1], and their labels."""
        end = len(self) if limit is None else min(limit, len(self))
        return self.pixels(self.images[:end]), self.labels[:end]

    def first(self, count):
        """The first ``count`` samples; the whole set if ``count`` is 0 or >= its size."""
        if count == 0 or count >= len(self):
            return self
        return ImageDataset(self.images[:count], self.labels[:count], self.num_classes, self.name)

    def split(self, count, seed=0):
        """``(rest, held_out)``: a random (seeded) ``count`` samples held out, and the others, in
        their original order. For a validation set drawn from the training data."""
        if not 0 < count < len(self):
            raise ValueError(f"{self.name}: cannot hold out {count} of {len(self)} samples; give 1 to {len(self) - 1}")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        held, rest = order[:count].sort().values, order[count:].sort().values
        return (ImageDataset(self.images[rest], self.labels[rest], self.num_classes, self.name),
                ImageDataset(self.images[held], self.labels[held], self.num_classes, self.name))

    def subset(self, count, seed=0):
        """A random (seeded) subset of ``count`` samples; the whole set if ``count`` >= its size."""
        if count >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]
        return ImageDataset(self.images[idx], self.labels[idx], self.num_classes, self.name)


def _find(directory, stem):
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def idx_dataset(directory, train=True, name="idx", check=True):
    """The train or test split of an MNIST-layout folder (``train-images-idx3-ubyte[.gz]`` ...).

    With ``check``, a data set pinned in :data:`SOURCES` reads only its pinned files, verified
    (a gzip whose plain name is pinned by the hash of its content)."""
    directory = Path(directory)
    paths = [_find(directory, stem) for stem in _SPLITS["train" if train else "test"]]
    if None in paths:
        missing = [s for s, p in zip(_SPLITS["train" if train else "test"], paths) if p is None]
        hint = f"; run `neurosens data fetch {name}`" if name in SOURCES else ""
        raise FileNotFoundError(f"{directory}: no {' or '.join(missing)} (plain or .gz){hint}")
    pinned = SOURCES.get(name, {}).get("files", {}) if check else {}
    if pinned:
        for path in paths:
            verify_pinned(path, pinned)
    images, labels = (read_idx(p) for p in paths)
    if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
        raise ValueError(f"{directory}: images {tuple(images.shape)} and labels {tuple(labels.shape)} do not pair up")
    return ImageDataset(images.unsqueeze(1), labels, 10, name)


def mnist(train=True, root=None):
    return idx_dataset(data_root(root) / "mnist", train, "mnist")


def fashion_mnist(train=True, root=None):
    return idx_dataset(data_root(root) / "fashion-mnist", train, "fashion-mnist")


def digits(train=True, size=28, test_size=297, seed=0):
    """scikit-learn's 1,797 8x8 digits (shipped with it), native (``size=8``) or bilinearly
    upsampled to ``size`` x ``size``; a fixed seeded split leaves ``test_size`` for testing."""
    from sklearn.datasets import load_digits

    if size < 8:
        raise ValueError(f"size={size}: digits are 8x8; size must be at least 8")
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # pixel values are 0..16
    y = torch.tensor(bunch.target, dtype=torch.int64)
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    part = order[test_size:] if train else order[:test_size]
    return ImageDataset(x[part], y[part], 10, "digits")


def cifar10(train=True, root=None, check=True):
    """CIFAR-10 from ``<root>/cifar-10-batches-py`` (the layout torchvision downloads). With
    ``check`` each batch must have the published md5; batches are read without running code."""
    directory = data_root(root) / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}; put the python version of CIFAR-10 "
                                f"(cifar-10-python.tar.gz, extracted) there or pass --root")
    if check:
        for n in names:
            verify(directory / n, PINNED_MD5["cifar10"][n], "md5")
    images, labels = zip(*(read_cifar_batch(directory / n) for n in names))
    return ImageDataset(torch.cat(images), torch.cat(labels), 10, "cifar10")


def synthetic(size=1024, shape=(3, 32, 32), num_classes=10, noise=0.15, seed=0):
    """Learnable random images for benchmarks: each class is a fixed random template plus noise."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand((num_classes, *shape), generator=gen)
    labels = torch.randint(num_classes, (size,), generator=gen)
    images = (templates[labels] + noise * torch.randn((size, *shape), generator=gen)).clamp_(0, 1)
    return ImageDataset((images * 255).round_().to(torch.uint8), labels, num_classes, "synthetic")


#: Data set name -> loader(train, root). Synthetic sets ignore root and differ between splits by seed.
DATASETS = {
    "mnist": mnist,
    "fashion-mnist": fashion_mnist,
    "digits": lambda train=True, root=None: digits(train, size=28),
    "digits8": lambda train=True, root=None: digits(train, size=8),
    "cifar10": cifar10,
    "synthetic-cifar": lambda train=True, root=None: synthetic(8192 if train else 1024, (3, 32, 32), seed=0 if train else 1),
    "synthetic-mnist": lambda train=True, root=None: synthetic(8192 if train else 1024, (1, 28, 28), seed=0 if train else 1),
}


def load(name, train=True, root=None):
    """A data set by name (see :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"data set {name!r} is unknown; expected one of {', '.join(DATASETS)}")
    return DATASETS[name](train=train, root=root)


def stats(name):
    """``(mean, std)`` per channel of a data set, or ``(None, None)`` when not known."""
    return STATS.get(name.replace("digits8", "digits"), (None, None))


def make_loader(dataset, batch_size, shuffle=False, seed=0, epoch=0, distributed=False, num_workers=0):
    """A DataLoader whose order depends only on ``(seed, epoch)``, so a resumed run sees the same
    batches. Under ``distributed``, each rank reads its own shard (DistributedSampler)."""
    if distributed:
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
