"""neurosens: neuron sensitivity for adversarial robustness.

The public names below load their module on first use, so that e.g. reading a saved report does
not load the compiled extension.
"""
import importlib

from .version import __version__

_WHERE = {
    "CW": "attacks", "FGSM": "attacks", "PGD": "attacks",
    "NeuronDistance": "ops", "neuron_distance": "ops", "neuron_distance_per_sample": "ops", "neuron_topk": "ops",
    "stabilize": "ops",
    "TopK": "selection",
    "info": "extension",
    "SensitivityReport": "report", "compare": "report",
    "NeuronSensitivity": "sensitivity", "measure": "sensitivity",
    "SNSRegularizer": "sns",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'neurosens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
