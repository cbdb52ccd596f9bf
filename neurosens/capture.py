"""See layers' outputs through forward hooks, and put a model in eval mode for a while.

Hooks live only inside a ``with`` block and are removed when it exits, also when the forward
raises; :func:`eval_mode` likewise gives every module back its own train/eval flag. Which layers
(and their neuron dims) is :mod:`neurosens.layers`' job.
"""
import contextlib
import warnings

import torch

from .layers import check_eager, eager, select_layers


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


def drop_silent_layers(modules, calls, where):
    """Leave out of ``modules`` (chosen by a rule, such as "auto") the layers that never ran as
    modules in a forward (``calls[name] == 0``): their parent applies their weights itself
    (torchvision's Swin attention calls ``F.linear(x, self.qkv.weight)``), so no hook sees them. A
    warning names them; layers chosen by name are refused instead (:meth:`LayerHooks.check_ran`)."""
    silent = [name for name, count in calls.items() if count == 0 and name in modules]
    if silent and len(silent) == len(modules):
        raise RuntimeError(f"{where}: none of the layers chosen by the rule ran as a module (their parents apply their "
                           "weights directly); name the layers to use")
    if silent:
        shown = ", ".join(silent[:4]) + (f" and {len(silent) - 4} more" if len(silent) > 4 else "")
        warnings.warn(f"{where}: {len(silent)} of the layers chosen by the rule never ran as modules (their parents "
                      f"apply their weights directly), so they are left out: {shown}", stacklevel=4)
        for name in silent:
            del modules[name]
    return silent


def version_of(t):
    """What :func:`check_unchanged` compares later: the tensor's version counter (None for an
    inference tensor, which cannot be changed in place outside inference mode)."""
    return None if t.is_inference() else t._version


def check_unchanged(name, t, version, who):
    """A layer output kept from a hook must still hold the layer's values: an in-place op after
    the layer (``ReLU(inplace=True)``) overwrites the storage the kept tensor shares."""
    if version is not None and t._version != version:
        raise RuntimeError(
            f"{who} layer {name!r}: its output was modified in place after the layer ran (by an in-place op such as "
            "ReLU(inplace=True) that follows it), so the kept values are no longer the layer's; choose the layer "
            "after that op instead, or make the op out-of-place"
        )


def forward_rows(args, kwargs):
    """The batch size of a forward called with ``args`` and ``kwargs``: dim 0 of its first tensor
    with dims (None when it has none)."""
    for leaf in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def check_batch_rows(name, t, rows, what):
    """A layer's output must hold its forward's ``rows`` (``what`` says which) along dim 0; a layer
    that puts the batch elsewhere (a sequence-first transformer) would pair the wrong rows."""
    if rows is not None and t.shape[0] != rows:
        raise RuntimeError(
            f"layer {name!r}: output of shape {list(t.shape)} has {t.shape[0]} rows, expected {rows} ({what}); "
            "the batch must be dim 0 of every chosen layer's output"
        )


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
        missing = [name for name in self.modules if self.calls[name] == 0]
        if missing:
            raise RuntimeError(
                f"layer(s) {', '.join(map(repr, missing))} never ran in the forward pass: they are defined "
                "in the model but its forward() does not call them (or applies their weights directly); leave them "
                "out of layers"
            )


class ActivationCapture(LayerHooks):
    """Context manager keeping the outputs of chosen layers: ``cap.activations[name]``.

    For analysis of a few batches; measuring over a data set should use
    :class:`neurosens.sensitivity.NeuronSensitivity`, which keeps no activation. A layer called
    several times per forward keeps all its outputs in call order in ``cap.outputs[name]``;
    ``activations[name]`` is the latest. ``detach=False`` keeps the graph (for losses).
    """

    def __init__(self, model, layers="auto", auto="conv_linear", output_index=None, detach=True):
        check_eager(model, "ActivationCapture")
        super().__init__(select_layers(model, layers, auto), self._store, output_index)
        self.detach = detach
        self._kept = {name: [] for name in self.modules}  # layer -> [(output, its version when kept)]

    def _store(self, name, t):
        if t.is_inference():
            # An inference tensor has no version counter to catch a later in-place op: keep a copy.
            self._kept[name].append((t.clone(), None))
            return
        # A detached tensor shares its source's version counter, so the check below still sees writes.
        self._kept[name].append((t.detach() if self.detach else t, version_of(t)))

    @property
    def outputs(self):
        """``{layer: [outputs in call order]}``; refused when an in-place op overwrote one since."""
        for name, kept in self._kept.items():
            for t, version in kept:
                check_unchanged(name, t, version, "captured")
        return {name: [t for t, _ in kept] for name, kept in self._kept.items()}

    @property
    def activations(self):
        self.check_ran()
        return {name: outs[-1] for name, outs in self.outputs.items()}

    def clear(self):
        for kept in self._kept.values():
            kept.clear()
        self.calls = {name: 0 for name in self.modules}


def capture_activations(model, x, layers="auto", auto="conv_linear", output_index=None):
    """Run ``model(x)`` without gradients and return ``{layer name: output}`` of the chosen layers."""
    model = eager(model)  # hooks fire only in eager code
    with torch.no_grad(), ActivationCapture(model, layers, auto, output_index) as cap:
        model(x)
    return cap.activations
