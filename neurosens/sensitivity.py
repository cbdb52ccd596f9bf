"""Streaming neuron sensitivity of a model over a whole data set.

For each batch the model runs once, in eval mode and without gradients, on the concatenated
batch ``[x; x_adv]``. Each chosen layer's forward hook splits its output into the benign and
adversarial halves and reduces them at once with :func:`neurosens.ops.neuron_distance_per_sample`
(the same fused pass as :func:`neurosens.ops.neuron_distance`) into [N, C] distances, which are
folded into per-neuron running sums and dropped, so no activation outlives its hook and memory is
O(total neurons), whatever the size of the data set. Besides the sums it keeps what the report's
uncertainty needs: per-neuron sums of squares (standard errors), the sums of the samples at even
and odd positions of the stream apart (split-half rankings; under ``torch.distributed``, positions
in each rank's own stream) and the sum of squares of each sample's layer mean (the standard error
of a layer's mean). Under ``torch.distributed`` all of it
is added over the ranks in :meth:`NeuronSensitivity.compute`, so every rank gets the same report.
"""
import types

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .capture import LayerHooks, check_batch_rows, drop_silent_layers, eval_mode
from .layers import NeuronDims, eager, select_layers, unwrap
from .checks import check_metric
from .env import model_device
from .evaluation import hits
from .outputs import check_logits, logits_of
from .ops import neuron_distance_per_sample
from .report import SensitivityReport
from .version import __version__


def describe(obj):
    """A short description for report metadata: a function's name, an object's own repr if its
    class defines one, else its class name."""
    if obj is None:
        return None
    if isinstance(obj, types.FunctionType):
        return obj.__name__
    if type(obj).__repr__ is object.__repr__:
        return type(obj).__name__
    return repr(obj)


class NeuronSensitivity:
    """Running per-neuron sensitivity of the chosen layers of ``model``.

    ``layers`` selects layers as in :func:`neurosens.layers.select_layers` (default: every
    conv/linear layer). ``metric`` is ``"l1"`` (the default: mean absolute difference of a neuron's
    map), ``"l2"`` or ``"cosine"``; ``relative=True`` divides ``l1``/``l2`` by the benign map's mean
    absolute value. Each layer's neuron dim is inferred from its module (an ``nn.Linear`` on
    [N, T, C] tokens: the last dim; see :class:`~neurosens.layers.NeuronDims`); ``channel_dim``
    (1 for [N, C, ...], -1 for [N, T, C], or a dict ``{layer name: dim}``) says it where the module
    does not. ``output_index`` picks the tensor from layers returning tuples. ``logits`` says where
    the model's output holds the logits (a key, an index or a callable; see
    :mod:`neurosens.outputs`): batches with labels count benign and adversarial accuracy from them.

    A layer run several times per forward (a shared ReLU, say) is reported once per call, as
    ``name#0``, ``name#1``, ..., each averaged over the samples whose forward made that call. The
    model's train/eval flags are restored after every update.
    """

    def __init__(self, model, layers="auto", metric="l1", channel_dim=None, relative=False, auto="conv_linear",
                 output_index=None, logits=None):
        check_metric(metric, "NeuronSensitivity", relative=relative)
        self.model = eager(model)  # hooks fire only in eager code
        self.modules = select_layers(model, layers, auto)
        self._by_rule = isinstance(layers, str) and layers == "auto"  # layers that never run are left out, not refused
        self.neuron_dims = NeuronDims(model, self.modules, channel_dim, "NeuronSensitivity")
        self.metric = metric
        self.relative = relative
        self.output_index = output_index
        self.logits = check_logits(logits, "NeuronSensitivity")
        self.reset()

    def reset(self):
        """Forget every batch seen so far."""
        self._sums = {}  # (layer, call index) -> running float64 statistics, see _moments
        self._shapes = {}  # (layer, call index) -> (per-sample output shape, neuron dim)
        self._samples = 0
        self._correct = torch.zeros(3, dtype=torch.float64)  # benign correct, adversarial correct, labelled samples
        self._calls = {}  # layer -> calls so far in the current forward
        self._batch = {}  # (layer, call index) -> (partial statistics, (shape, neuron dim)) of the current forward

    @property
    def samples(self):
        """Benign/adversarial pairs seen on this rank."""
        return self._samples

    def _reduce(self, name, t, batch):
        key = (name, self._calls[name])
        self._calls[name] += 1
        check_batch_rows(name, t, 2 * batch, f"benign and adversarial batches of {batch}")
        cdim = self.neuron_dims(name, t)
        shape = list(t.shape[1:])
        if key in self._shapes and self._shapes[key][0][cdim - 1] != shape[cdim - 1]:
            raise RuntimeError(
                f"layer {name!r}: output of shape {list(t.shape)} has {shape[cdim - 1]} neurons along dim {cdim}, "
                f"earlier batches had {self._shapes[key][0][cdim - 1]}"
            )
        distances = neuron_distance_per_sample(t[:batch], t[batch:], self.metric, cdim, self.relative)
        self._batch[key] = (_moments(distances.to(torch.float64), self._samples), (shape, cdim))

    @torch.no_grad()
    def _forward(self, x, x_adv, y):
        batch = x.shape[0]
        self._calls = {name: 0 for name in self.modules}
        self._batch = {}
        hooks = LayerHooks(self.modules, lambda name, t: self._reduce(name, t, batch), self.output_index)
        with eval_mode(self.model), hooks:
            out = self.model(torch.cat([x, x_adv]))
        if self._by_rule and self._samples == 0:
            drop_silent_layers(self.modules, hooks.calls, "NeuronSensitivity")
        hooks.check_ran()
        correct = None
        if y is not None:
            out = logits_of(out, self.logits, "NeuronSensitivity (labels given, accuracies counted)")
            if out.dim() != 2 or out.shape[0] != 2 * batch:
                raise ValueError(f"NeuronSensitivity: the logits have shape {list(out.shape)}, expected [{2 * batch}, classes] "
                                 "to count the accuracies of the labelled batch; say where they are with logits=")
            right = hits(out, y.to(out.device).repeat(2)).view(2, batch).sum(1).to(torch.float64).cpu()
            correct = torch.cat([right, right.new_tensor([batch])])
        # Commit only once the whole batch succeeded, so a failing batch leaves everything untouched.
        for key, (partial, layout) in self._batch.items():
            if key in self._sums:
                for field, value in partial.items():
                    self._sums[key][field] += value
            else:
                self._sums[key], self._shapes[key] = partial, layout
        self._samples += batch
        if correct is not None:
            self._correct += correct

    def update(self, x, x_adv=None, attack=None, y=None):
        """Add one batch: ``update(x, x_adv)`` with adversarial inputs given, or
        ``update(x, y, attack=atk)`` to craft them with ``x_adv = atk(x, y)`` (model in eval mode).

        Labels (``y``) are optional with given inputs; when known, accuracies go into the report.
        """
        if attack is not None:
            y = x_adv if y is None else y
            if y is None:
                raise ValueError("NeuronSensitivity.update: an attack needs the labels: update(x, y, attack=atk)")
            with eval_mode(self.model):
                x_adv = attack(x, y)
        elif x_adv is None:
            raise ValueError("NeuronSensitivity.update: give the adversarial inputs (update(x, x_adv)) or an attack (update(x, y, attack=atk))")
        if not isinstance(x, torch.Tensor) or not isinstance(x_adv, torch.Tensor):
            raise TypeError(f"NeuronSensitivity.update: x and x_adv must be tensors, got {type(x).__name__} and {type(x_adv).__name__}")
        if x.shape != x_adv.shape:
            raise ValueError(f"NeuronSensitivity.update: x of shape {list(x.shape)} and x_adv of shape {list(x_adv.shape)} differ")
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"NeuronSensitivity.update: the batch is empty (x of shape {list(x.shape)})")
        if y is not None and (not isinstance(y, torch.Tensor) or list(y.shape) != [x.shape[0]]):
            got = f"shape {list(y.shape)}" if isinstance(y, torch.Tensor) else f"type {type(y).__name__}"
            raise ValueError(f"NeuronSensitivity.update: y has {got}; expected [{x.shape[0]}], one label per sample of x")
        self._forward(x, x_adv.to(device=x.device, dtype=x.dtype), y)

    def _reduced(self):
        """Statistics (see :func:`_moments`), samples and correct counts, added over all ranks when
        torch.distributed is running."""
        keys = list(self._sums)
        sums = {k: {field: v.clone() for field, v in self._sums[k].items()} for k in keys}
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return keys, sums, self._samples, self._correct.clone()
        all_keys = [None] * dist.get_world_size()
        dist.all_gather_object(all_keys, keys)
        if any(other != keys for other in all_keys):
            raise RuntimeError(
                "NeuronSensitivity.compute: ranks measured different layers "
                f"(this rank: {[f'{n}#{i}' for n, i in keys]}); every rank must see at least one batch"
            )
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        parts = [v.to(device).flatten() for k in keys for v in sums[k].values()]
        parts.append(torch.tensor([float(self._samples)], dtype=torch.float64, device=device))
        parts.append(self._correct.to(device))
        flat = torch.cat(parts)
        dist.all_reduce(flat)
        offset = 0
        for k in keys:
            for field, v in sums[k].items():
                sums[k][field] = flat[offset:offset + v.numel()].view_as(v).to(v.device)
                offset += v.numel()
        samples = int(round(flat[offset].item()))
        correct = flat[offset + 1:].cpu()
        return keys, sums, samples, correct

    def compute(self, meta=None):
        """The :class:`SensitivityReport` of everything seen so far (all ranks under torch.distributed).

        ``meta`` adds entries to the report's metadata (e.g. ``{"attack": "PGD eps=8/255"}``).
        """
        if self._samples == 0:
            raise RuntimeError("NeuronSensitivity.compute: no batch seen yet; call update() first")
        keys, sums, samples, correct = self._reduced()
        repeated = {name for name, i in keys if i > 0}
        sensitivity, stderr, layer_stderr, halves, layer_info = {}, {}, {}, {}, {}
        for name, i in keys:
            label = f"{name}#{i}" if name in repeated else name
            stats = {field: v.cpu() for field, v in sums[(name, i)].items()}
            half_counts = [int(round(c)) for c in stats["count"].tolist()]
            n = sum(half_counts)
            total = stats["sum"].sum(0)
            sensitivity[label] = total / n
            stderr[label] = _standard_error(total, stats["square"], n)
            layer_stderr[label] = _standard_error(total.mean().view(1), stats["layer_square"], n).item()
            halves[label] = stats["sum"] / stats["count"].unsqueeze(1)
            shape, cdim = self._shapes[(name, i)]
            layer_info[label] = {"shape": shape, "channel_dim": cdim, "samples": n, "half_samples": half_counts}
        info = {
            "model": type(unwrap(self.model)).__name__,
            "metric": self.metric,
            "relative": self.relative,
            "samples": samples,
            "layers": layer_info,
            "neurosens": __version__,
        }
        if correct[2] > 0:
            info["clean_accuracy"] = correct[0].item() / correct[2].item()
            info["adversarial_accuracy"] = correct[1].item() / correct[2].item()
        info.update(meta or {})
        return SensitivityReport(sensitivity, info, stderr=stderr, layer_stderr=layer_stderr, halves=halves)


def _moments(distances, start):
    """The running statistics of one batch of [N, C] float64 distances whose first sample sits at
    position ``start`` of the stream: ``sum`` [2, C] (samples at even and odd positions apart, the
    two halves of a split-half ranking), ``count`` [2] (samples per half, on the host: it follows
    from N and ``start`` alone), ``square`` [C] (sums of squares) and ``layer_square`` [1] (sum of
    squares of each sample's mean over the neurons). No op here waits for the GPU, so a
    measurement's host work overlaps the forward passes."""
    n = distances.shape[0]
    even = (n + 1 - start % 2) // 2  # positions in [start, start + n) that are even
    first, second = distances[0::2].sum(0), distances[1::2].sum(0)  # rows of the half of row 0, then of the other
    return {
        "sum": torch.stack([first, second] if start % 2 == 0 else [second, first]),
        "count": torch.tensor([even, n - even], dtype=torch.float64),
        "square": distances.square().sum(0),
        "layer_square": distances.mean(1).square().sum(0, keepdim=True),
    }


def _standard_error(total, square, n):
    """Standard error of the mean (sample standard deviation / sqrt(n)) from a sum and a sum of
    squares over ``n`` samples; NaN below two samples, where the spread is undefined."""
    if n < 2:
        return torch.full_like(total, float("nan"))
    mean = total / n
    # Rounding can leave a constant neuron's variance a hair below zero.
    variance = ((square - n * mean.square()) / (n - 1)).clamp_min(0)
    return (variance / n).sqrt()


def measure(
    model,
    loader,
    attack=None,
    layers="auto",
    metric="l1",
    channel_dim=None,
    relative=False,
    auto="conv_linear",
    output_index=None,
    logits=None,
    device=None,
    max_batches=None,
    progress=True,
    meta=None,
):
    """Measure neuron sensitivity over ``loader`` and return a :class:`SensitivityReport`.

    With an ``attack`` (a callable ``attack(x, y) -> x_adv``) each batch is ``(x, y, ...)``;
    without one each batch is ``(x, x_adv)`` or ``(x, x_adv, y)``. Batches move to ``device``
    (default: the model's). ``max_batches`` stops early. The other arguments are those of
    :class:`NeuronSensitivity`, except that ``logits=None`` takes the attack's ``logits`` when it has
    one; ``meta`` adds to the report's metadata.
    """
    if attack is not None and not callable(attack):
        raise TypeError(f"measure: attack={attack!r} must be a callable attack(x, y) -> x_adv, such as "
                        "ns.PGD(model, eps=0.1) (neurosens.attacks.make_attack builds one by name)")
    if logits is None:
        logits = getattr(attack, "logits", None)
    meter = NeuronSensitivity(model, layers, metric, channel_dim, relative, auto, output_index, logits)
    device = torch.device(device) if device is not None else model_device(model)
    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    bar = tqdm(loader, total=total, desc="sensitivity", unit="batch", disable=not progress, leave=False)
    try:
        for step, batch in enumerate(bar):
            if max_batches is not None and step >= max_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TypeError(
                    "measure: each batch must be a tuple (x, y, ...) with an attack, or (x, x_adv[, y]) without one; "
                    f"got {type(batch).__name__}"
                )
            x = batch[0].to(device)
            if attack is None and isinstance(batch[1], torch.Tensor) and not batch[1].is_floating_point():
                raise ValueError(
                    f"measure: the second item of each batch holds integer labels (shape {list(batch[1].shape)}), not "
                    "adversarial inputs; give attack= to craft them (e.g. attack=neurosens.PGD(model, eps)), or "
                    "give batches (x, x_adv[, y])"
                )
            if attack is not None:
                meter.update(x, batch[1].to(device), attack=attack)
            else:
                y = batch[2].to(device) if len(batch) > 2 else None
                meter.update(x, batch[1].to(device), y=y)
            bar.set_postfix(samples=meter.samples, refresh=False)
    finally:
        bar.close()
    info = {"attack": describe(attack) if attack is not None else "given adversarial inputs"}
    info.update(meta or {})
    return meter.compute(info)
