"""Choose layers of any ``nn.Module`` and see their outputs through forward hooks.

Layers are chosen by exact name (``"layer1.0.conv1"``), glob pattern (``"layer3.*.conv2"``), module
type (``nn.Conv2d``), a list mixing these, or ``"auto"``. Hooks live only inside a ``with`` block
and are removed when it exits, also when the forward raises; :func:`eval_mode` likewise gives every
module back its own train/eval flag.
"""
import contextlib
import difflib
import fnmatch
from collections import OrderedDict

import torch
from torch import nn

from . import checks

#: What ``"auto"`` selects: every layer with weights (its pre-activation output), or every ReLU.
AUTO_KINDS = {
    "conv_linear": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear),
    "relu": (nn.ReLU, nn.ReLU6, nn.LeakyReLU),
}

_GLOB_CHARS = set("*?[")


def unwrap(model):
    """The module whose names the user sees: DataParallel/DDP wrappers add a ``module.`` prefix."""
    wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    return model.module if isinstance(model, wrappers) else model


def _describe(spec):
    if isinstance(spec, type):
        return f"{spec.__module__}.{spec.__qualname__}"
    return repr(spec)


def _match_one(spec, named, auto, model_name):
    """Names of the modules in ``named`` (name -> module) that ``spec`` selects; never empty."""
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        found = [name for name, m in named.items() if isinstance(m, spec)]
        if not found:
            raise ValueError(f"layers={_describe(spec)}: {model_name} has no module of that type")
        return found
    if isinstance(spec, tuple) and spec and all(isinstance(t, type) and issubclass(t, nn.Module) for t in spec):
        found = [name for name, m in named.items() if isinstance(m, spec)]
        if not found:
            raise ValueError(f"layers={tuple(map(_describe, spec))}: {model_name} has none of these module types")
        return found
    if not isinstance(spec, str):
        raise TypeError(
            f"layers: each entry must be a layer name, a glob pattern, an nn.Module subclass or 'auto', got {spec!r}"
        )
    if spec == "auto":
        if auto not in AUTO_KINDS:
            raise ValueError(f"auto={auto!r} is unknown; expected one of {', '.join(map(repr, AUTO_KINDS))}")
        found = [name for name, m in named.items() if isinstance(m, AUTO_KINDS[auto])]
        if not found:
            kinds = ", ".join(t.__name__ for t in AUTO_KINDS[auto])
            raise ValueError(f"layers='auto' (auto={auto!r}): {model_name} has no {kinds} module")
        return found
    if _GLOB_CHARS & set(spec):
        found = [name for name in named if fnmatch.fnmatchcase(name, spec)]
        if not found:
            sample = ", ".join(list(named)[:8])
            raise ValueError(f"layers: pattern {spec!r} matches no layer of {model_name}; its layers start with: {sample}")
        return found
    if spec not in named:
        close = difflib.get_close_matches(spec, list(named), n=5, cutoff=0.5)
        hint = f"; close matches: {', '.join(close)}" if close else f"; its layers start with: {', '.join(list(named)[:8])}"
        raise ValueError(f"layers: {model_name} has no layer named {spec!r}{hint}")
    return [spec]


def select_layers(model, layers="auto", auto="conv_linear"):
    """An ordered ``{name: module}`` of the layers that ``layers`` selects, in the model's order.

    ``layers`` is a name, a glob pattern, an ``nn.Module`` subclass (or tuple of them), ``"auto"``,
    or a list of these. ``"auto"`` means every conv/linear layer, or every ReLU with
    ``auto="relu"``. Every entry must select at least one layer; unknown names list close matches.
    """
    root = unwrap(model)
    named = OrderedDict((name, m) for name, m in root.named_modules() if name)
    if not named:
        raise ValueError(f"layers: {type(root).__name__} has no submodules to hook")
    specs = list(layers) if isinstance(layers, (list, set)) else [layers]
    if not specs:
        raise ValueError("layers: the list of layers is empty")
    chosen = set()
    for spec in specs:
        chosen.update(_match_one(spec, named, auto, type(root).__name__))
    return OrderedDict((name, m) for name, m in named.items() if name in chosen)


def output_tensor(name, output, output_index=None):
    """The tensor a layer produced; ``output_index`` picks it from a tuple/list/dict output."""
    if output_index is not None:
        if not isinstance(output, (tuple, list, dict)):
            raise TypeError(
                f"layer {name!r}: output_index={output_index!r} was given but the layer returned a "
                f"{type(output).__name__}, not a tuple, list or dict"
            )
        try:
            output = output[output_index]
        except (IndexError, KeyError):
            size = f"keys {list(output)}" if isinstance(output, dict) else f"{len(output)} items"
            raise IndexError(f"layer {name!r}: output_index={output_index!r} is not in its output ({size})") from None
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list, dict)):
        kinds = ", ".join(type(v).__name__ for v in (output.values() if isinstance(output, dict) else output))
        raise TypeError(
            f"layer {name!r} returned a {type(output).__name__} ({kinds}), not a tensor; "
            "pick the element to measure with output_index"
        )
    raise TypeError(f"layer {name!r} returned a {type(output).__name__}, not a tensor")


def check_channel_dim(name, t, channel_dim):
    """The non-negative channel dim of ``t``; errors name the layer and its shape."""
    if t.dim() < 2:
        raise ValueError(f"layer {name!r}: output of shape {list(t.shape)} has no channel dim (need [N, C, ...] or [N, ..., C])")
    return checks.check_channel_dim(channel_dim, t.shape, f"layer {name!r}", "its output of shape")


@contextlib.contextmanager
def eval_mode(model):
    """Put every module of ``model`` in eval mode, and give each back its own mode on exit (they
    may differ, e.g. a frozen BatchNorm in a training model)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


class LayerHooks:
    """Context manager calling ``fn(name, tensor)`` on each selected layer's output.

    ``modules`` is a ``{name: module}`` (from :func:`select_layers`). ``calls[name]`` counts the
    calls seen; :meth:`check_ran` raises for layers that never ran. Hooks are removed on exit.
    """

    def __init__(self, modules, fn, output_index=None):
        self.modules = modules
        self.fn = fn
        self.output_index = output_index
        self.calls = {name: 0 for name in modules}
        self._handles = []

    def _hook(self, name):
        def hook(module, inputs, output):
            self.calls[name] += 1
            self.fn(name, output_tensor(name, output, self.output_index))

        return hook

    def __enter__(self):
        try:
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def check_ran(self):
        missing = [name for name, n in self.calls.items() if n == 0]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(map(repr, missing))} never ran in the forward pass: they are defined "
                "in the model but its forward() does not call them; leave them out of layers"
            )


class ActivationCapture(LayerHooks):
    """Context manager keeping the outputs of chosen layers: ``cap.activations[name]``.

    For analysis of a few batches; measuring over a data set should use
    :class:`neurosens.sensitivity.NeuronSensitivity`, which keeps no activation. A layer called
    several times per forward keeps all its outputs in call order in ``cap.outputs[name]``;
    ``activations[name]`` is the latest. ``detach=False`` keeps the graph (for losses).
    """

    def __init__(self, model, layers="auto", auto="conv_linear", output_index=None, detach=True):
        super().__init__(select_layers(model, layers, auto), self._store, output_index)
        self.detach = detach
        self.outputs = {name: [] for name in self.modules}

    def _store(self, name, t):
        self.outputs[name].append(t.detach() if self.detach else t)

    @property
    def activations(self):
        self.check_ran()
        return {name: outs[-1] for name, outs in self.outputs.items()}

    def clear(self):
        for outs in self.outputs.values():
            outs.clear()
        self.calls = {name: 0 for name in self.modules}


def capture_activations(model, x, layers="auto", auto="conv_linear", output_index=None):
    """Run ``model(x)`` without gradients and return ``{layer name: output}`` of the chosen layers."""
    with torch.no_grad(), ActivationCapture(model, layers, auto, output_index) as cap:
        model(x)
    return cap.activations
