"""Checkpoints: atomic writes, reading them back, the RNG state of a run, and rebuilding a model.

All checkpoints hold only tensors and primitive containers, so ``torch.load(path,
weights_only=True)`` reads them, and a ``digest`` of every tensor they hold, checked on load, so
corrupted weights never load silently.
"""
import hashlib
import os
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import torch

from .capture import eval_mode
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
    """Restore what :func:`rng_state` returned (its tensors on the host, as generator states must be)."""
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


def _tensors(obj, key=""):
    """Every tensor in nested dicts, lists and tuples, with its path, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield key, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{key}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{key}/{i}")


def digest(state):
    """sha256 over the path, dtype, shape and bytes of every tensor of ``state`` but its own digest."""
    h = hashlib.sha256()
    for key, t in _tensors({k: v for k, v in state.items() if k != "digest"}):
        h.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(state, path):
    """Write the dict ``state`` atomically with the :func:`digest` of its tensors."""
    atomic_save({**state, "digest": digest(state)}, path)


def remove_stale_temporaries(folder):
    """Delete what :func:`atomic_save` of a killed process left behind in ``folder``."""
    for tmp in Path(folder).glob(".*.tmp*"):
        if tmp.is_file():
            tmp.unlink()


def load_checkpoint(path, device="cpu"):
    """A checkpoint written by :class:`~neurosens.training.Trainer` (tensors on ``device``).

    Raises FileNotFoundError for a missing file and ValueError naming the file for one that is
    empty, corrupt, holds anything but tensors and containers, or whose tensors fail their digest.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the checkpoint file is empty")
    try:
        with warnings.catch_warnings():
            # torch's note on the pickle protocol of a file it then refuses adds nothing to the one line below.
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        reason = str(err).strip().splitlines()[0].split(". ")[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path}: not a neurosens checkpoint (it has no 'model' entry)")
    if "digest" in state and state["digest"] != digest(state):
        raise ValueError(f"{path}: the weights' checksum does not match the one recorded when it was written; "
                         "the file is corrupt")
    return state


def check_fits(model, dataset, source):
    """One image of ``dataset`` through ``model`` before any long work, so a model built for other
    inputs (a digits model asked about MNIST) fails with one line naming both."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = dataset[0][0].unsqueeze(0).to(device)
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except RuntimeError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{source}: the model does not take the {dataset.name} images of shape "
                         f"{list(x.shape[1:])} ({reason})") from None


def trained_on(state, source, data=None):
    """``data`` if given, else the data set the run of checkpoint ``state`` (from ``source``) recorded."""
    name = data or (state.get("meta") or {}).get("data")
    if not name:
        raise ValueError(f"{source}: the checkpoint does not record its data set; give --data")
    return name


def training_eps(state, source, eps=None):
    """``eps`` if given, else the eps the run of checkpoint ``state`` (from ``source``) trained with."""
    eps = eps if eps is not None else (state.get("config") or {}).get("eps")
    if eps is None:
        raise ValueError(f"{source}: the checkpoint does not record a training eps; give --eps")
    return eps


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
    _check_shapes(spec, state["model"], source)
    model = build_model(**spec)
    model.load_state_dict(state["model"])
    return model.to(device).eval()


def _check_shapes(spec, weights, source):
    """Refuse a model description that does not match the weights, before allocating it: the
    description is built on the meta device, which holds shapes only."""
    try:
        with torch.device("meta"):
            expected = build_model(**spec).state_dict()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: the recorded model {spec} cannot be built: {err}") from None
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ValueError(f"{source}: the recorded model {spec.get('name')!r} does not fit the weights: "
                         f"missing {', '.join(missing[:5]) or 'none'}; unexpected {', '.join(unexpected[:5]) or 'none'}")
    for key, t in expected.items():
        if not isinstance(weights[key], torch.Tensor) or list(weights[key].shape) != list(t.shape):
            got = list(weights[key].shape) if isinstance(weights[key], torch.Tensor) else type(weights[key]).__name__
            raise ValueError(f"{source}: the recorded model {spec.get('name')!r} has {key!r} of shape {list(t.shape)}, "
                             f"the weights {got}")


def load_model(path, device="cpu", arch=None, dataset=None):
    """The model of the checkpoint at ``path`` (``model.pt`` or ``checkpoint.pt``); see :func:`model_from_state`."""
    return model_from_state(load_checkpoint(path), path, device, arch, dataset)
