"""Which layers of any ``nn.Module``, and along which dim of each one's output its neurons lie.

Layers are chosen by exact name (``"layer1.0.conv1"``), glob pattern (``"layer3.*.conv2"``), module
type (``nn.Conv2d``), a list mixing these, or ``"auto"``; :class:`NeuronDims` is the one rule for
where a chosen layer's neurons are (``nn.Linear`` on tokens: the last dim, convolutions: dim 1).
"""
import difflib
import fnmatch
import sys
from collections import OrderedDict

from torch import nn

from . import checks

#: Activation modules, for ``auto="activations"``.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
               nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus)
#: Modules whose output has the shape, and so the neurons, of their input.
_SHAPE_PRESERVING = ACTIVATIONS + (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
#: Norm layers, by the features they declare: num_features on dim 1 (the first seven), then
#: GroupNorm's channels on dim 1 and LayerNorm's last dim.
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d, nn.InstanceNorm2d,
          nn.InstanceNorm3d, nn.GroupNorm, nn.LayerNorm)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

#: What ``"auto"`` selects, by kind.
AUTO_KINDS = {
    "conv_linear": "every conv/linear layer (its pre-activation output)",
    "relu": "every ReLU, ReLU6 and LeakyReLU",
    "activations": "every activation module (ReLU family, GELU, SiLU, Hardswish, Tanh, ...)",
    "mlp": "the MLP hidden units of each transformer block: its first Linear outside the attention",
    "blocks": "each transformer block's output, the residual stream",
}


def attention_of(module):
    """The ``nn.MultiheadAttention`` directly inside ``module`` (what makes it a transformer block), or None."""
    return next((m for m in module.children() if isinstance(m, nn.MultiheadAttention)), None)


def _called_functionally(named):
    """Names of modules their parent uses only through their weights, so a hook on them never fires:
    ``nn.MultiheadAttention`` applies ``out_proj`` with ``F.linear``."""
    return {f"{name}.out_proj" for name, m in named.items() if isinstance(m, nn.MultiheadAttention)}


def _auto(named, auto):
    """Names ``"auto"`` selects for kind ``auto``, in model order."""
    skip = _called_functionally(named)
    if auto == "conv_linear":
        return [n for n, m in named.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n not in skip]
    if auto == "relu":
        return [n for n, m in named.items() if isinstance(m, (nn.ReLU, nn.ReLU6, nn.LeakyReLU))]
    if auto == "activations":
        return [n for n, m in named.items() if isinstance(m, ACTIVATIONS)]
    blocks = [n for n, m in named.items() if attention_of(m) is not None]
    if auto == "blocks":
        return blocks
    found = []
    for block in blocks:
        inner = [n for n, m in named.items() if n.startswith(block + ".") and isinstance(m, nn.Linear) and n not in skip]
        found += inner[:1]
    return found


_GLOB_CHARS = set("*?[")


_PARALLEL = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def _compiled(model):
    """Whether ``model`` is a ``torch.compile``'d module. torch.compile imports dynamo, so without
    it nothing is compiled; importing it here would start threads that abort a gloo process at exit."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and isinstance(model, dynamo.eval_frame.OptimizedModule)


def _wrappers(model):
    """``model`` and the modules its DataParallel/DDP and compile wrappers hold, outermost first."""
    yield model
    while isinstance(model, _PARALLEL) or _compiled(model):
        model = model.module if isinstance(model, _PARALLEL) else model._orig_mod
        yield model


def eager(model):
    """The module to run when hooks must fire: a ``torch.compile``'d module's original, since
    compiled code skips hooks added after it was traced (and would keep stale ones)."""
    while _compiled(model):
        model = model._orig_mod
    return model


def check_eager(model, who):
    """Refuse a ``torch.compile``'d module (also inside DataParallel/DDP) where the caller runs the
    model itself: the hooks that capture or edit its layers would not fire in compiled code."""
    if any(_compiled(m) for m in _wrappers(model)):
        raise ValueError(f"{who}: the model is torch.compile'd, and compiled code skips the hooks that see its layers; "
                         "pass the original module (model._orig_mod) and run that one inside the block")


def unwrap(model):
    """The module whose names the user sees: DataParallel/DDP wrappers add a ``module.`` prefix
    and ``torch.compile`` an ``_orig_mod.`` one."""
    *_, inner = _wrappers(model)
    return inner


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
        found = _auto(named, auto)
        if not found:
            raise ValueError(f"layers='auto' (auto={auto!r}: {AUTO_KINDS[auto]}) selects nothing in {model_name}")
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
    or a list of these. ``"auto"`` selects by the kind ``auto`` names (:data:`AUTO_KINDS`), and
    never a module its parent calls only through its weights (the ``out_proj`` of
    ``nn.MultiheadAttention``), whose hook would never fire. Every entry must select at least one
    layer; unknown names list close matches.
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


def _declared(module):
    """``(dim, count, what)``: the output dim a module puts its neurons on, how many, and the
    module's own words for it; None when the module does not say."""
    if isinstance(module, nn.Linear):
        return -1, module.out_features, f"nn.Linear(out_features={module.out_features})"
    if isinstance(module, _CONVS):
        return 1, module.out_channels, f"{type(module).__name__}(out_channels={module.out_channels})"
    norm = next((c for c in _NORMS if isinstance(module, c)), None)
    if norm is not None and type(module).forward is not norm.forward:
        # A norm with a forward of its own may move its features (a LayerNorm2d normalizes dim 1 of
        # an [N, C, H, W] map by permuting it to the last dim and back), or only cast (CLIP's): a
        # LayerNorm's features are then on whichever of dim 1 and the last dim has their count.
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
            count = module.normalized_shape[0]
            return None, count, f"{type(module).__name__}({count}), a LayerNorm with its own forward,"
        return None
    if isinstance(module, _NORMS[:7]):
        return 1, module.num_features, f"{type(module).__name__}(num_features={module.num_features})"
    if isinstance(module, nn.GroupNorm):
        return 1, module.num_channels, f"nn.GroupNorm(num_channels={module.num_channels})"
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return -1, module.normalized_shape[0], f"nn.LayerNorm({module.normalized_shape[0]})"
    if isinstance(module, nn.MultiheadAttention):
        return -1, module.embed_dim, f"nn.MultiheadAttention(embed_dim={module.embed_dim})"
    attention = attention_of(module)
    if attention is not None:
        return -1, attention.embed_dim, f"a transformer block of width {attention.embed_dim}"
    return None


def _declared_in_place(root, name, module):
    """What ``module`` declares, or, for an activation or dropout inside an ``nn.Sequential``, what
    the nearest earlier sibling that is neither declares (its neurons pass through unchanged)."""
    own = _declared(module)
    if own is not None or not isinstance(module, _SHAPE_PRESERVING):
        return own
    parent_name, _, key = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    if not isinstance(parent, nn.Sequential):
        return None
    children = list(parent.named_children())
    keys = [k for k, _ in children]
    if key not in keys:
        return None
    position = keys.index(key)
    for _, m in reversed(children[:position]):
        if not isinstance(m, _SHAPE_PRESERVING):
            found = _declared(m)
            return None if found is None else (found[0], found[1], f"the {found[2]} it follows")
    return None


def _sequence_first(module):
    """Whether ``module`` is a torch module that keeps the batch on dim 1 ([T, N, C]): attention,
    transformer layers and stacks, and recurrent layers built with ``batch_first=False``. A block
    of one's own that holds such attention may transpose around it, so it is not judged."""
    if isinstance(module, (nn.MultiheadAttention, nn.Transformer, nn.RNNBase)):
        return not module.batch_first
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return len(module.layers) > 0 and _sequence_first(module.layers[0])
    return False


def sequence_first_part(root, name):
    """The name of the innermost part of ``root`` that is, or holds, module ``name`` and keeps the
    batch on dim 1 (see :func:`_sequence_first`); None when there is none."""
    path = name.split(".") if name else []
    for depth in range(len(path), -1, -1):
        part = ".".join(path[:depth])
        if _sequence_first(root.get_submodule(part)):
            return part
    return None


def check_hookable(root, name):
    """Refuse a layer whose output hooks cannot pair: inside (or being) a sequence-first part, its
    output has the batch on dim 1, where benign and adversarial rows cannot be told apart by shape
    (T == 2N passes any row count); inside a torch.compile'd submodule, compiled code skips hooks."""
    if "_orig_mod" in name.split("."):
        raise ValueError(f"layer {name!r} runs inside a torch.compile'd submodule, and compiled code skips the hooks "
                         "that see layers; compile the whole model (it is then measured through its original) or none of it")
    part = sequence_first_part(root, name)
    if part is not None:
        module = root.get_submodule(part)
        raise ValueError(
            f"layer {name!r} runs inside {part or 'the model'!r}, a {type(module).__name__} with batch_first=False: "
            "its outputs are [T, N, C], and measuring or pairing neurons needs the batch on dim 0; build it with "
            "batch_first=True"
        )


class NeuronDims:
    """Where the neurons of each chosen layer's output lie: the one rule of measurement, SNS and
    interventions.

    A module that says so fixes the dim: ``nn.Linear`` the last dim (``out_features``), convolutions
    and BatchNorm dim 1, ``nn.LayerNorm`` and transformer blocks (modules holding an
    ``nn.MultiheadAttention``) the last dim; an activation or dropout in an ``nn.Sequential``
    follows the module before it. Otherwise ``[N, C]`` and ``[N, C, H, W, ...]`` outputs use dim 1,
    and a 3-d output, which could be ``[N, C, L]`` or ``[N, T, C]``, needs ``channel_dim``.

    ``channel_dim`` is None (infer every layer), an int for the layers that declare nothing (one
    that contradicts a declaring layer is refused), or ``{layer: dim}``, which overrides that layer
    whatever it declares; unlisted layers are inferred.
    """

    def __init__(self, model, modules, channel_dim=None, where="channel_dim"):
        root = unwrap(model)
        for name in modules:
            check_hookable(root, name)
        self.specs = {name: _declared_in_place(root, name, m) for name, m in modules.items()}
        self.kinds = {name: type(m).__name__ for name, m in modules.items()}
        if isinstance(channel_dim, dict):
            unknown = sorted(set(channel_dim) - set(modules))
            if unknown:
                raise ValueError(f"{where}: channel_dim names layers that are not selected: {', '.join(unknown)}")
            self.default, self.overrides = None, dict(channel_dim)
        elif channel_dim is None or checks.integer(channel_dim) is not None:
            self.default, self.overrides = (None if channel_dim is None else checks.integer(channel_dim)), {}
        else:
            raise TypeError(f"{where}: channel_dim={channel_dim!r} must be None, an int or a dict {{layer: int}}, not {type(channel_dim).__name__}")

    def count(self, name):
        """The layer's neuron count when its module declares it and no override moves the dim, else None."""
        spec = self.specs[name]
        return None if spec is None or name in self.overrides else spec[1]

    def __call__(self, name, t):
        """The non-negative neuron dim of ``t``, the output of layer ``name``."""
        shape = list(t.shape)
        if t.dim() < 2:
            raise ValueError(f"layer {name!r}: output of shape {shape} has no channel dim (need [N, C, ...] or [N, ..., C])")
        if name in self.overrides:
            return checks.check_channel_dim(self.overrides[name], shape, f"layer {name!r}", "its output of shape")
        spec = self.specs[name]
        if spec is not None and spec[0] is None:
            dim, count, what = spec
            found = sorted({d for d in (1, t.dim() - 1) if shape[d] == count})
            if len(found) != 1:
                raise ValueError(
                    f"layer {name!r}: {what} has {count} neurons, and its output {shape} has "
                    f"{'that many on both dim 1 and the last dim' if found else 'that many on neither dim 1 nor the last dim'}; "
                    f"say where they are with channel_dim={{{name!r}: dim}}"
                )
            spec = (found[0], count, what)
        if spec is not None:
            dim, count, what = spec
            dim %= t.dim()
            if dim == 0 or shape[dim] != count:
                raise ValueError(
                    f"layer {name!r}: {what} puts {count} neurons on dim {spec[0]}, but its output has shape {shape}; "
                    f"say where they are with channel_dim={{{name!r}: dim}}"
                )
            if self.default is not None:
                given = checks.check_channel_dim(self.default, shape, f"layer {name!r}", "its output of shape")
                if given != dim:
                    raise ValueError(
                        f"layer {name!r}: channel_dim={self.default} would take the {shape[given]} entries of dim {given} "
                        f"of its output {shape} as neurons, but {what} has its {count} neurons on dim {dim}; leave "
                        f"channel_dim out to infer it, or override this layer with channel_dim={{{name!r}: {self.default}}}"
                    )
            return dim
        if self.default is not None:
            return checks.check_channel_dim(self.default, shape, f"layer {name!r}", "its output of shape")
        if t.dim() == 3:
            raise ValueError(
                f"layer {name!r} ({self.kinds[name]}) gives a 3-d output {shape}: its neurons could be dim 1 "
                f"([N, C, L]) or the last dim ([N, T, C] tokens); say which with channel_dim={{{name!r}: 1}} or -1"
            )
        return 1
