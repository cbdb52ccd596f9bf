"""Sensitive Neuron Stabilizing (SNS): keep the most sensitive neurons' outputs alike on x and x'.

On each batch the benign and adversarial outputs of the chosen layers are captured (with their
graphs), the top-k most sensitive neurons of each layer are selected on that batch by
``select_metric`` (the selection is not differentiated), and the fused :func:`neurosens.ops.stabilize`
op gives the stabilizing term and its gradient::

    reg = SNSRegularizer(model, layers=["conv2", "fc1"], k=0.3, lam=1.0)
    for x, y in loader:
        x_adv = attack(x, y)
        with reg.capture():
            logits, logits_adv = model(torch.cat([x, x_adv])).chunk(2)
        loss = F.cross_entropy(logits_adv, y) + reg.loss()

One forward of the concatenated batch is the BatchNorm-safe way, and what SNS training does by
default (``SNSConfig.forward="joint"``): a training-mode BatchNorm updates its running statistics
once per step, from the statistics of x and x' together, and normalizes both halves with the same
batch statistics. Two forwards (``model(x), model(x_adv)``, ``forward="separate"``, and
``reg.capture("separate")``) update the statistics twice per step and normalize each half with
its own statistics. Models without BatchNorm compute the same either way. Either way the dropout
modules give x and x' one mask (:mod:`neurosens.pairing`), so the difference the term sees comes
from the inputs, not from dropout noise.

Under ``torch.distributed`` the per-neuron statistics are summed over ranks before the top-k, so
every rank stabilizes the same neurons.
"""
import contextlib
import dataclasses
import math
from collections import OrderedDict

import torch
import torch.distributed as dist

from .capture import LayerHooks, check_batch_rows, check_unchanged, drop_silent_layers, version_of
from .checks import check_metric
from .layers import NeuronDims, check_eager, select_layers, unwrap
from .ops import neuron_distance, stabilize
from .pairing import FORWARDS, SharedDropout
from .reference import METRICS
from .selection import resolve_k, topk


#: Which examples enter SNS training's adversarial cross-entropy: all, or those right on the benign input.
ADV_EXAMPLES = ("all", "correct")
#: Which neurons of each layer SNS stabilizes: the k most sensitive on the batch, k drawn at random, or all.
SELECTIONS = ("topk", "random", "all")
#: Named sets of layers (see :func:`sns_layers`); "auto" is "all".
LAYER_PRESETS = ("auto", "all", "hidden", "logits")


def _option(default, help, cli_type=None, choices=None, part="regularizer"):
    """A field of :class:`SNSConfig` with what the ``--sns-*`` command-line flag needs."""
    return dataclasses.field(default=default, metadata={"help": help, "type": cli_type, "choices": choices, "part": part})


def _count_or_fraction(text):
    """k as a neuron count ("8") or a fraction of each layer ("0.1")."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def _batches_or_epoch(text):
    """refresh as a number of batches ("4") or "epoch"."""
    if text == "epoch":
        return text
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a number of batches nor 'epoch'") from None


@dataclasses.dataclass
class SNSConfig:
    """The options of SNS, in one place: :class:`SNSRegularizer` and
    :class:`~neurosens.methods.SNSLoss` take them, :class:`~neurosens.training.TrainConfig` holds
    them as ``sns_<name>`` and the train command as ``--sns-<name>``. ``clean_weight``,
    ``adv_examples`` and ``forward`` belong to the loss, the others to the regularizer;
    ``refresh="epoch"`` is for training runs, which turn it into their batches per epoch."""

    layers: object = _option("auto", "layers to stabilize: all (or auto): every conv/linear; hidden: all but the last, "
                                     "which gives the logits; logits: that last one; or comma-separated names or patterns")
    k: object = _option(0.3, "neurons per layer: a count (8) or a fraction (0.1)", _count_or_fraction)
    lam: float = _option(1.0, "weight of the stabilizing term", float)
    metric: str = _option("l1", "stabilizing distance", choices=METRICS)
    select_metric: str = _option("l1", "sensitivity that ranks the neurons", choices=METRICS)
    refresh: object = _option(1, "re-select the neurons every N batches, or every epoch", _batches_or_epoch)
    detach_benign: bool = _option(False, "pull only the adversarial outputs", bool)
    select: str = _option("topk", "neurons of each layer: topk, the k most sensitive on the batch; random, k drawn "
                                  "from a seeded generator at each refresh; all, every neuron (k is ignored)", choices=SELECTIONS)
    seed: int = _option(0, "seed of the random selection", int)
    clean_weight: float = _option(0.0, "weight of the clean cross-entropy", float, part="loss")
    adv_examples: str = _option("all", "examples in the adversarial cross-entropy: all, or those right on the benign input "
                                "(averaged over the whole batch, the others counting 0)",
                                choices=ADV_EXAMPLES, part="loss")
    forward: str = _option("joint", "joint: one forward of [x; x_adv], so BatchNorm updates its statistics once per step "
                                    "and normalizes both halves alike; separate: a benign and an adversarial forward",
                           choices=FORWARDS, part="loss")

    def check(self, where="SNS", prefix="", per_epoch=False):
        """Raise for the first bad option, naming it ``<prefix><name>``; ``refresh="epoch"`` is
        accepted with ``per_epoch``."""
        check_metric(self.metric, where, prefix + "metric")
        check_metric(self.select_metric, where, prefix + "select_metric")
        lam = self.lam
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"{where}: {prefix}lam={lam!r} must be a finite number >= 0")
        refresh = self.refresh
        if not (per_epoch and refresh == "epoch") and (isinstance(refresh, bool) or not isinstance(refresh, int) or refresh < 1):
            also = " or 'epoch'" if per_epoch else ""
            raise ValueError(f"{where}: {prefix}refresh={refresh!r} must be an int >= 1 (re-select every that many batches){also}")
        for value in (self.k.values() if isinstance(self.k, dict) else [self.k]):
            resolve_k(value, None, where, prefix + "k")
        if not self.clean_weight >= 0:
            raise ValueError(f"{where}: {prefix}clean_weight={self.clean_weight!r} must be >= 0")
        if self.adv_examples not in ADV_EXAMPLES:
            raise ValueError(f"{where}: {prefix}adv_examples={self.adv_examples!r} is unknown; expected one of {', '.join(ADV_EXAMPLES)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"{where}: {prefix}select={self.select!r} is unknown; expected one of {', '.join(SELECTIONS)}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{where}: {prefix}seed={self.seed!r} must be an int")
        if self.forward not in FORWARDS:
            raise ValueError(f"{where}: {prefix}forward={self.forward!r} is unknown; expected one of {', '.join(FORWARDS)}")
        return self

    def options(self, part):
        """The options of one ``part`` ("regularizer" or "loss") as keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata["part"] == part}


def sns_layers(model, layers="auto", auto="conv_linear"):
    """The ordered ``{name: module}`` SNS regularizes. ``layers`` is a preset of
    :data:`LAYER_PRESETS`, over the layers of kind ``auto`` (every conv/linear by default): "all"
    (or "auto") all of them, "logits" the last one in the model's module order, which gives the
    logits in the models of :mod:`neurosens.models`, "hidden" the others; or anything
    :func:`neurosens.layers.select_layers` takes."""
    if not (isinstance(layers, str) and layers in LAYER_PRESETS):
        return select_layers(model, layers, auto)
    every = select_layers(model, "auto", auto)
    last = next(reversed(every))
    if layers == "logits":
        return OrderedDict([(last, every.pop(last))])
    if layers == "hidden":
        every.pop(last)
        if not every:
            raise ValueError(f"layers='hidden': {type(unwrap(model)).__name__} has no {auto} layer before {last!r}, the last one")
    return every


class SNSRegularizer:
    """The SNS term for any training loop (see the module docstring).

    ``layers`` selects layers as :func:`sns_layers` does; ``k`` is a count or a fraction of each
    layer's neurons, or a ``{layer: k}`` dict; ``select`` picks the neurons: the k most sensitive by
    ``select_metric`` ("topk"), k drawn uniformly by a generator seeded with ``seed`` ("random", the
    control for the selection), or every neuron ("all", k ignored); ``metric`` ("cosine", "l1", "l2") is
    the stabilizing distance and ``select_metric`` the sensitivity that ranks neurons; ``lam`` weighs
    the mean of the per-layer terms; ``refresh`` re-selects every that many calls of :meth:`loss`
    (in between the last selection is kept); ``detach_benign`` pulls only the adversarial side,
    which is cheaper but, on models that are already somewhat robust, gives a weight gradient that
    points against the term's true gradient (docs/results.md, ablations). ``channel_dim`` is that
    of :class:`~neurosens.sensitivity.NeuronSensitivity`: inferred per layer from its module when
    None, an int, or a ``{layer: dim}`` dict.
    """

    def __init__(self, model, layers=SNSConfig.layers, k=SNSConfig.k, lam=SNSConfig.lam, metric=SNSConfig.metric,
                 select_metric=SNSConfig.select_metric, refresh=SNSConfig.refresh, detach_benign=SNSConfig.detach_benign,
                 select=SNSConfig.select, seed=SNSConfig.seed, channel_dim=None, auto="conv_linear", output_index=None):
        check_eager(model, "SNS")
        self.root = unwrap(model)
        self.modules = sns_layers(self.root, layers, auto)
        self._by_rule = isinstance(layers, str) and layers in LAYER_PRESETS  # layers that never run are left out
        SNSConfig(layers=layers, k=k, lam=lam, metric=metric, select_metric=select_metric, refresh=refresh,
                  detach_benign=detach_benign, select=select, seed=seed).check()
        self.neuron_dims = NeuronDims(model, self.modules, channel_dim, "SNS")
        ks = k if isinstance(k, dict) else {name: k for name in self.modules}
        unknown = sorted(set(ks) - set(self.modules))
        if unknown:
            raise ValueError(f"SNS: k is given for layers that are not regularized: {', '.join(unknown)}")
        missing = sorted(set(self.modules) - set(ks))
        if missing:
            raise ValueError(f"SNS: k has no entry for layers {', '.join(missing)}")
        for name, value in ks.items():
            resolve_k(value, self.neuron_dims.count(name), f"SNS layer {name!r}")
        self.k = ks
        self.lam = float(lam)
        self.metric, self.select_metric = metric, select_metric
        self.refresh = refresh
        self.detach_benign = detach_benign
        self.select = select
        # On the CPU and seeded alike on every rank, so all ranks draw the same neurons.
        self.generator = torch.Generator().manual_seed(seed)
        self.output_index = output_index
        self.selections = {}  # layer -> indices of the neurons stabilized last
        self._outputs = {name: [] for name in self.modules}  # layer -> [(output, its version when captured)]
        self._pair_run = SharedDropout(self.root, "SNS")  # also records the forwards of the last capture()
        self._calls = 0

    @contextlib.contextmanager
    def capture(self, forward="joint"):
        """Context manager recording the chosen layers' outputs, with their graphs. ``forward``
        says how the pair runs inside it, "joint" (one forward of ``[x; x_adv]``) or "separate"
        (``x``, then ``x_adv``), so that both see one dropout mask (:mod:`neurosens.pairing`)."""
        for outs in self._outputs.values():
            outs.clear()
        with self._pair_run(forward), LayerHooks(self.modules, self._keep, self.output_index) as hooks:
            yield hooks

    def _keep(self, name, t):
        # The version counter tells later whether an in-place op overwrote the values kept here.
        self._outputs[name].append((t, version_of(t)))

    def _pair(self, name):
        for t, version in self._outputs[name]:
            check_unchanged(name, t, version, "SNS")
        outs = [t for t, _ in self._outputs[name]]
        if len(self._pair_run.rows) == 1 and len(outs) > 1:
            raise RuntimeError(
                f"SNS layer {name!r} ran {len(outs)} times in one forward; SNS pairs one output per forward (the "
                "two halves of one forward of [x; x_adv], or one benign and one adversarial forward): choose a "
                "layer that runs once per forward"
            )
        if len(outs) == 2:
            if len(self._pair_run.rows) == 2:
                for t, rows in zip(outs, self._pair_run.rows):
                    check_batch_rows(name, t, rows, "the batch of its forward")
            return outs
        if len(outs) == 1:
            if len(self._pair_run.rows) == 1:
                check_batch_rows(name, outs[0], self._pair_run.rows[0], "the batch of one forward of [x; x_adv]")
            if outs[0].shape[0] % 2:
                raise ValueError(f"SNS layer {name!r}: one forward of odd batch {outs[0].shape[0]} cannot be split into [x; x_adv]")
            return outs[0].chunk(2)
        raise RuntimeError(
            f"SNS layer {name!r} ran {len(outs)} times inside capture(); expected a benign and an adversarial "
            "forward (or one forward of the concatenated [x; x_adv])"
        )

    def _select(self, a, b, k, cdim, distributed):
        count = a.shape[cdim]
        if self.select == "all":
            return torch.arange(count, device=a.device)
        if self.select == "random":
            return torch.randperm(count, generator=self.generator)[:k].sort().values.to(a.device)
        stat = neuron_distance(a, b, self.select_metric, cdim).sum
        if distributed:
            dist.all_reduce(stat)
        return topk(stat, k).indices

    def loss(self):
        """``lam`` times the mean over layers of the stabilizing term of each layer's selection."""
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._by_rule and self._pair_run.rows:  # also after a resume, which does not record what was left out
            for name in drop_silent_layers(self.modules, {n: len(outs) for n, outs in self._outputs.items()}, "SNS"):
                del self._outputs[name], self.k[name]
        run = self._pair_run
        if run.ran and len(run.rows) != (1 if run.pairing == "joint" else 2):
            raise RuntimeError(
                f"SNS: {len(run.rows)} forward(s) ran inside capture(forward={run.pairing!r}) with dropout in training "
                f"mode, so the benign and adversarial inputs did not share its masks; pass "
                f"capture(forward={'separate' if len(run.rows) == 2 else 'joint'!r})"
            )
        select_now = self._calls % self.refresh == 0
        terms = []
        for name in self.modules:
            a, b = self._pair(name)
            cdim = self.neuron_dims(name, a)
            if self.detach_benign:
                a = a.detach()
            k = resolve_k(self.k[name], a.shape[cdim], f"SNS layer {name!r}")
            if select_now and self.select == "topk" and not distributed:
                # One pass: the fused op selects and stabilizes together.
                term, self.selections[name] = stabilize(
                    a, b, k=k, metric=self.metric, select_metric=self.select_metric, channel_dim=cdim, return_indices=True
                )
            else:
                if select_now or name not in self.selections:
                    self.selections[name] = self._select(a, b, k, cdim, distributed)
                term = stabilize(a, b, indices=self.selections[name], metric=self.metric, channel_dim=cdim)
            terms.append(term)
        for outs in self._outputs.values():
            outs.clear()
        self._calls += 1
        return self.lam * torch.stack(terms).mean()

    def state_dict(self):
        """The selection state (current neurons, call count and the random selection's generator),
        so a resumed run re-selects on the same batches and draws the same neurons."""
        return {"calls": self._calls, "selections": {name: idx.detach().cpu() for name, idx in self.selections.items()},
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        unknown = sorted(set(state["selections"]) - set(self.modules))
        if unknown:
            raise ValueError(f"SNS: the saved selections name layers that are not regularized: {', '.join(unknown)}")
        device = next((p.device for m in self.modules.values() for p in m.parameters()), torch.device("cpu"))
        self._calls = int(state["calls"])
        self.selections = {name: idx.to(device) for name, idx in state["selections"].items()}
        if "generator" in state:  # absent from states saved before the random selection existed
            self.generator.set_state(state["generator"])
