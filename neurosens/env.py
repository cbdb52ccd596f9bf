"""What the environment decides: boolean switches from environment variables, which device to
run on when none is named (the model's own, or the best one visible), and which optional packages
are installed."""
import importlib
import os

import torch

class MissingDependency(ImportError):
    """An optional package that a feature needs is not installed; the message says what to install."""


def require(module, feature, package, install):
    """The module ``module``, imported; :class:`MissingDependency` naming ``feature``, the missing
    ``package`` and the ``install`` command when it cannot be imported."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{feature} needs the optional package {package}, which is not installed "
                                f"({install})") from None


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def env_flag(name, default=False):
    """The boolean environment variable ``name``: 1/true/yes/on or 0/false/no/off (any case);
    unset or empty gives ``default``, anything else is an error."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{name}={os.environ[name]!r}: expected one of {', '.join(_TRUE + _FALSE)}")


def default_device(device=None):
    """``device`` if given (checked: a device type torch knows, and a CUDA device this machine
    has), else the current CUDA device when one is visible, else the CPU."""
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device {device!r} is unknown; give cpu, cuda or cuda:N") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use cpu")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ValueError(f"device {str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def model_device(model):
    """The device of ``model``'s first parameter or buffer; the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
