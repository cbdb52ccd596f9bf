"""Checkpoints: atomic writes, reading them back, the RNG state of a run, and rebuilding a model.

All checkpoints hold only tensors and primitive containers, so ``torch.load(path,
weights_only=True)`` reads them.
"""
import os
import random
from pathlib import Path

import numpy as np
import torch

from .models import build_model


def rng_state():
    """The RNG states of torch, CUDA, numpy and Python, as tensors and primitives."""
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(state):
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def atomic_save(obj, path):
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by :class:`~neurosens.training.Trainer` (tensors on ``device``)."""
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a neurosens checkpoint (it has no 'model' entry)")
    return state


def trained_on(state, source, data=None):
    """``data`` if given, else the data set the run of checkpoint ``state`` (from ``source``) recorded."""
    name = data or (state.get("meta") or {}).get("data")
    if not name:
        raise ValueError(f"{source}: the checkpoint does not record its data set; give --data")
    return name


def model_from_state(state, source, device="cpu", arch=None, dataset=None):
    """The model of a checkpoint ``state`` (from :func:`load_checkpoint` of ``source``), in eval mode.

    It is rebuilt from the ``build_model`` arguments the run recorded as ``meta["model"]`` (as
    :class:`~neurosens.training.Trainer` does with ``meta={"model": ...}``); a checkpoint without
    them needs ``arch``, and takes the input shape and classes from ``dataset``.
    """
    spec = dict((state.get("meta") or {}).get("model") or {})
    if spec and arch and spec.get("name") != arch:
        raise ValueError(f"{source}: the checkpoint holds a {spec.get('name')!r} model, but --arch is {arch!r}")
    if not spec:
        if not arch or dataset is None:
            raise ValueError(f"{source}: the checkpoint does not record its architecture; give --arch and the data set, "
                             "or rebuild the model yourself and load state['model']")
        channels, size = dataset.shape[0], dataset.shape[1]
        spec = {"name": arch, "num_classes": dataset.num_classes, "in_channels": channels, "input_size": size}
        if any(key.startswith("normalize.") for key in state["model"]):
            # Placeholders: the checkpoint's own mean and std are loaded below.
            spec.update(mean=[0.0] * channels, std=[1.0] * channels)
    model = build_model(**spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def load_model(path, device="cpu", arch=None, dataset=None):
    """The model of the checkpoint at ``path`` (``model.pt`` or ``checkpoint.pt``); see :func:`model_from_state`."""
    return model_from_state(load_checkpoint(path), path, device, arch, dataset)
