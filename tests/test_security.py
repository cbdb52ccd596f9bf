"""Hostile and corrupted files: nothing read from a data root or a checkpoint runs code, allocates
what its metadata claims before it is checked, or loads silently when it differs from what was pinned."""
import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from neurosens import data
from neurosens.checkpoint import load_checkpoint, load_model, save_checkpoint

from conftest import SPEC, fresh_model


class RunsCode:
    """Unpickling this calls os.system: what a crafted data file would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def cifar_batch(n, seed):
    rng = np.random.default_rng(seed)
    return {b"batch_label": b"testing batch 1 of 1", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"filenames": [b"x.png"] * n}


def write_cifar(root, batch, name="test_batch"):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder / name


def test_cifar_batches_are_read_without_running_code(tmp_path):
    batch = cifar_batch(6, 0)
    write_cifar(tmp_path, batch)
    ds = data.cifar10(train=False, root=tmp_path, check=False)
    assert ds.labels.tolist() == batch[b"labels"]
    assert torch.equal(ds.images, torch.from_numpy(batch[b"data"]).view(6, 3, 32, 32))

    marker = tmp_path / "ran"
    write_cifar(tmp_path, {b"data": RunsCode(marker), b"labels": [0]})
    with pytest.raises(ValueError, match=r"test_batch: .*posix.system|test_batch: .*os.system"):
        data.cifar10(train=False, root=tmp_path, check=False)
    assert not marker.exists()
    # With the pinned checksums (the default) the file is refused before it is read at all.
    with pytest.raises(data.ChecksumError, match="test_batch: md5 is"):
        data.cifar10(train=False, root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("bad, message", [
    ({b"labels": [0]}, "no b'data'"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]}, r"\[N, 3072\]"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "2 images but 1 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, r"labels in \[0, 10\)"),
    ([1, 2], "not a dict"),
])
def test_cifar_batches_of_the_wrong_structure_are_refused(tmp_path, bad, message):
    write_cifar(tmp_path, bad)
    with pytest.raises(ValueError, match=message):
        data.cifar10(train=False, root=tmp_path, check=False)


def test_cifar_pins_the_published_md5_of_every_batch():
    pinned = data.PINNED_MD5["cifar10"]
    assert set(pinned) == {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch"}
    assert pinned["test_batch"] == "40351d587109b95175f43aff81a1287e"


def idx_bytes(array):
    array = np.asarray(array, np.uint8)
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def test_gzipped_idx_files_are_verified_too(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([1, 2, 3, 4, 5], np.uint8)
    folder = tmp_path / "mnist"
    folder.mkdir()
    raw = {"t10k-images-idx3-ubyte": idx_bytes(images), "t10k-labels-idx1-ubyte": idx_bytes(labels)}
    pins = {name: hashlib.sha256(content).hexdigest() for name, content in raw.items()}
    monkeypatch.setitem(data.SOURCES, "mnist", {"origin": "test", "files": pins})
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw["t10k-images-idx3-ubyte"]))
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw["t10k-labels-idx1-ubyte"]))
    assert data.mnist(train=False, root=tmp_path).labels.tolist() == [1, 2, 3, 4, 5]
    # Every label set to 7: the gzip is valid, its content is not the pinned one.
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(5, 7, np.uint8))))
    with pytest.raises(data.ChecksumError, match=r"t10k-labels-idx1-ubyte.gz: sha256 of its content is"):
        data.mnist(train=False, root=tmp_path)


def test_files_without_a_pinned_hash_are_refused(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    gz = {"t10k-images-idx3-ubyte.gz": gzip.compress(idx_bytes(np.zeros((2, 28, 28)))),
          "t10k-labels-idx1-ubyte.gz": gzip.compress(idx_bytes(np.zeros(2)))}
    monkeypatch.setitem(data.SOURCES, "fashion-mnist",
                        {"origin": "test", "files": {n: hashlib.sha256(b).hexdigest() for n, b in gz.items()}})
    (folder / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((2, 28, 28))))
    (folder / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(2)))
    with pytest.raises(data.ChecksumError, match="t10k-images-idx3-ubyte has no pinned hash"):
        data.fashion_mnist(train=False, root=tmp_path)


def saved_model(tmp_path, spec=SPEC):
    model = fresh_model()
    path = tmp_path / "model.pt"
    save_checkpoint({"model": model.state_dict(), "meta": {"model": spec, "data": "digits8"}}, path)
    return model, path


def test_checkpoint_metadata_is_checked_against_the_weights_before_building(tmp_path, monkeypatch):
    _, path = saved_model(tmp_path, dict(SPEC, width=4096, hidden=4096))
    import neurosens.checkpoint as ckpt

    built = []
    real = ckpt.build_model

    def recording(**spec):
        model = real(**spec)
        built.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(ckpt, "build_model", recording)
    with pytest.raises(ValueError, match=r"model.pt: .*'conv1.weight' .*\[4096, 1, 5, 5\].* \[8, 1, 5, 5\]"):
        load_model(path)
    assert built == ["meta"], built  # only a shape-only model was built


@pytest.mark.parametrize("spec", [dict(SPEC, name="no-such-net"), dict(SPEC, depth=3), dict(SPEC, width="8")])
def test_a_model_description_that_cannot_be_built_is_one_error(tmp_path, spec):
    _, path = saved_model(tmp_path, spec)
    with pytest.raises(ValueError, match="model.pt: the recorded model .* cannot be built"):
        load_model(path)


def test_flipped_bytes_in_the_weights_are_detected(tmp_path):
    model, path = saved_model(tmp_path)
    assert torch.equal(load_model(path).conv1.weight, model.conv1.weight)
    raw = bytearray(path.read_bytes())
    weights = model.state_dict()["fc1.weight"].numpy().tobytes()
    at = bytes(raw).find(weights)
    assert at > 0
    for i in range(at + 100, at + 164):
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.pt: the weights' checksum does not match"):
        load_checkpoint(path)


@pytest.mark.parametrize("content, message", [
    (b"", "empty"),
    (b"PK\x03\x04 not really a zip", "not a readable checkpoint"),
    (pickle.dumps(RunsCode("/nonexistent/x")), "not a readable checkpoint"),
])
def test_corrupt_and_hostile_checkpoints_give_one_clear_error(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"model.pt: .*{message}"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_hostile_torch_save_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "model.pt"
    torch.save({"model": {}, "meta": RunsCode(marker)}, path)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists()


def test_report_labels_cannot_escape_the_output_folder(tmp_path):
    from neurosens.study import report_files

    out = tmp_path / "rep"
    labels = ["/abs/path", "../../x", "a<b>/c", "..", ".hidden", "ok-name_1.2", "a_b_c", "A_B_C"]
    paths = report_files(out, labels)
    assert [p.name for p in paths.values()] == [
        "abs_path.report.json", "x.report.json", "a_b_c.report.json", "model.report.json", "hidden.report.json",
        "ok-name_1.2.report.json", "a_b_c-2.report.json", "A_B_C-3.report.json"]
    assert all(p.parent == out for p in paths.values())


@pytest.mark.slow
def test_report_command_keeps_every_file_under_out(tmp_path):
    from neurosens.cli import main

    model = tmp_path / "run" / "model.pt"
    model.parent.mkdir()
    save_checkpoint({"model": fresh_model().state_dict(), "meta": {"model": SPEC, "data": "digits8"}}, model)
    outside = tmp_path / "abs"
    assert main(["report", str(model), str(model), "--labels", str(outside), "../../up", "--eps", "0.1",
                 "-n", "16", "--steps", "1", "--seeds", "1", "--layers", "conv2,fc1", "--device", "cpu",
                 "--out", str(tmp_path / "rep")]) == 0
    assert not outside.with_suffix(".report.json").exists() and not (tmp_path.parent / "up.report.json").exists()
    names = sorted(p.name for p in (tmp_path / "rep").glob("*.report.json"))
    assert len(names) == 2 and names[0].endswith("_abs.report.json") and names[1] == "up.report.json", names
