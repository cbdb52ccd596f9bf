"""Attacks: FGSM, PGD (L-inf and L2), CW-L-inf, the neuron-targeted PGD that adapts to SNS, and,
through torchattacks, AutoAttack and the black-box Square attack.

Call convention::

    atk = PGD(model, eps=8/255, alpha=2/255, steps=10)
    x_adv = atk(x, y)                  # untargeted
    x_adv = atk(x, y, target=t)        # with targeted=True; t defaults to a random wrong class

Inputs are pixels in [0, 1], with any normalization inside the model
(:class:`neurosens.models.Normalize`); ``clip=(lo, hi)`` sets other bounds. An attack warns once
when its inputs fall outside the bounds (they would be clipped into them, far beyond eps) and when
an L-inf eps spans the whole range, as a budget on the 0-255 scale (``eps=8`` for ``8/255``) would.
An attack runs the model in eval mode and restores every module's own mode afterwards; it
differentiates with ``torch.autograd.grad`` with respect to the input only, so the parameters'
``.grad`` are never touched. The result is detached, inside the bounds and inside the eps-ball
around ``x``. A model whose output is not the logits tensor itself (a dict, a tuple) needs
``logits=``: a key, an index or a callable (:mod:`neurosens.outputs`).
"""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .capture import LayerHooks, check_unchanged, drop_silent_layers, eval_mode, version_of
from .checks import check_metric
from .env import require
from .layers import NeuronDims, eager
from .ops import neuron_distance_per_sample, stabilize
from .outputs import LogitsModel, check_logits, logits_of
from .selection import resolve_k
from .sns import LAYER_PRESETS, SNSConfig, sns_layers

NORMS = ("linf", "l2")
LOSSES = ("ce", "cw")
STARTS = ("uniform", "normal", "none")
PIXELS = (0.0, 1.0)


def margin_loss(logits, y):
    """Per-sample CW margin: the best other logit minus the logit of ``y`` (> 0 means misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(1)
    return other - true


def _per_sample_norm(t, norm):
    flat = t.flatten(1)
    return (flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1)).view(-1, *[1] * (t.dim() - 1))


def project(x_adv, x, eps, norm, clip=PIXELS):
    """Project ``x_adv`` onto the eps-ball around ``x`` and the ``clip`` box."""
    low = x.dtype in (torch.float16, torch.bfloat16)
    xf = x.float() if low else x
    delta = x_adv.to(xf.dtype) - xf
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _per_sample_norm(delta, "l2").clamp_min(1e-12)).clamp(max=1.0)
    # Clamping to the box only shrinks each coordinate of delta, so the ball still holds.
    out = (xf + delta).clamp(*clip)
    if not low:
        return out
    # Rounding to 8 or 11 bits can land a coordinate half a unit past the ball's edge (6% of eps
    # 8/255 in bfloat16); one step toward x brings every coordinate back within |delta|.
    out = out.to(x.dtype)
    moved = out.float() - xf
    over = moved.abs() > eps if norm == "linf" else _per_sample_norm(moved, "l2") > eps
    return torch.where(over, torch.nextafter(out, x), out)


def check_clip(clip):
    """``clip`` as a ``(lo, hi)`` pair of floats, lo < hi."""
    if (not isinstance(clip, (tuple, list)) or len(clip) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in clip)
            or not clip[0] < clip[1]):
        raise ValueError(f"clip={clip!r}: must be a pair (lo, hi) of finite numbers with lo < hi (the bounds of the inputs)")
    return float(clip[0]), float(clip[1])


def random_targets(y, num_classes, generator=None):
    """A uniformly random class different from ``y`` for every sample."""
    shift = torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)
    return (y + shift) % num_classes


class Attack:
    """Base class: validates the budget, handles mode, targets and final projection.

    Subclasses implement ``_perturb(x, y, target)`` and may use ``self._loss`` (the per-sample
    objective the attack maximizes)."""

    name = "attack"

    def __init__(self, model, eps, norm="linf", loss="ce", targeted=False, num_classes=None, clip=PIXELS, logits=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not (isinstance(eps, (int, float)) and eps >= 0):
            raise ValueError(f"eps={eps!r}: must be a number >= 0 (input units, pixels in [0, 1] by default)")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r} is unknown; expected one of {', '.join(NORMS)}")
        if not callable(loss) and loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; expected one of {', '.join(LOSSES)} or a callable")
        self.model, self.eps, self.norm, self.loss, self.targeted = model, float(eps), norm, loss, bool(targeted)
        self.num_classes = num_classes
        self.clip = check_clip(clip)
        self.logits = check_logits(logits, type(self).__name__)
        self._warned_range = False
        width = self.clip[1] - self.clip[0]
        if norm == "linf" and self.eps >= width:
            scale = f"; on the 0-255 scale write eps={self.eps:g}/255" if self.clip == PIXELS else ""
            warnings.warn(f"{type(self).__name__}: eps={self.eps:g} spans the whole input range clip={self.clip} "
                          f"(width {width:g}), so the budget constrains nothing{scale}", stacklevel=3)

    def __repr__(self):
        fields = {k: v for k, v in vars(self).items() if k != "model" and not k.startswith("_")}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"

    def _logits(self, x):
        return logits_of(self.model(x), self.logits, type(self).__name__)

    def _loss(self, logits, y):
        """Per-sample objective to maximize; for a targeted attack ``y`` is the target."""
        if callable(self.loss):
            value = self.loss(logits, y)
        elif self.loss == "ce":
            value = F.cross_entropy(logits, y, reduction="none")
        else:
            value = margin_loss(logits, y)
        return -value if self.targeted else value

    def _objective(self, x_adv, y):
        """The logits at ``x_adv`` and the per-sample objective the attack ascends (differentiable)."""
        logits = self._logits(x_adv)
        return logits, self._loss(logits, y)

    def _grad(self, x_adv, y):
        x_adv = x_adv.detach().requires_grad_(True)
        _, loss = self._objective(x_adv, y)
        grad, = torch.autograd.grad(loss.sum(), x_adv)
        return grad, loss.detach()

    def __call__(self, x, y, target=None):
        if x.dim() < 2 or y.dim() != 1 or len(x) != len(y):
            raise ValueError(f"expected x [N, ...] and labels [N], got x {tuple(x.shape)} and y {tuple(y.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{type(self).__name__}: x is {x.dtype}, but an attack perturbs real-valued inputs; for token "
                            "ids, attack the embeddings (a model taking them) instead")
        x = x.detach()
        self._check_range(x)
        if self.eps == 0:
            return x.clone()
        with eval_mode(self.model), torch.enable_grad():
            if self.targeted:
                if target is None:
                    num_classes = self.num_classes or self._logits(x[:1]).shape[1]
                    target = random_targets(y, num_classes)
                y = target
            elif target is not None:
                raise ValueError("target= was given to an untargeted attack; build it with targeted=True")
            x_adv = self._perturb(x, y.detach())
        return project(x_adv.detach(), x, self.eps, self.norm, self.clip)

    def _check_range(self, x):
        """Warn, once per attack, when inputs lie outside the bounds (e.g. normalized images)."""
        if self._warned_range or x.numel() == 0:
            return
        lo, hi = x.min().item(), x.max().item()
        if lo < self.clip[0] or hi > self.clip[1]:
            self._warned_range = True
            warnings.warn(
                f"{type(self).__name__}: inputs span [{lo:.3g}, {hi:.3g}], outside the attack's bounds clip={self.clip}; "
                "adversarial inputs are clipped into the bounds, moving such pixels by more than eps. Attacks work in "
                "pixel space: normalize inside the model (neurosens.models.Normalize), or give clip=(lo, hi)",
                stacklevel=3,
            )

    def _perturb(self, x, y):
        raise NotImplementedError


class FGSM(Attack):
    """One signed-gradient step of size eps (L-inf), or one normalized-gradient step (L2)."""

    name = "fgsm"

    def _perturb(self, x, y):
        grad, _ = self._grad(x, y)
        return x + self.eps * _direction(grad, self.norm)


def _direction(grad, norm):
    if norm == "linf":
        return grad.sign()
    return grad / _per_sample_norm(grad, "l2").clamp_min(1e-12)


class PGD(Attack):
    """Projected gradient descent (Madry et al.) on cross-entropy, or on the CW margin (``loss="cw"``).

    ``alpha`` is the step size (default ``2.5 * eps / steps``). ``random_start``: ``"uniform"``
    (or True) in the eps-ball, ``"normal"`` (0.001 * N(0, 1), as TRADES starts), ``"none"`` (or
    False). With ``restarts`` > 1, each sample keeps the restart that fooled the model, else the one
    with the highest loss.
    """

    name = "pgd"

    def __init__(self, model, eps, alpha=None, steps=10, norm="linf", random_start=True, restarts=1,
                 loss="ce", targeted=False, num_classes=None, clip=PIXELS, logits=None):
        super().__init__(model, eps, norm, loss, targeted, num_classes, clip, logits)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r}: must be an integer >= 1")
        if not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts={restarts!r}: must be an integer >= 1")
        alpha = 2.5 * self.eps / steps if alpha is None else alpha
        # A zero budget needs no step; any other budget needs a positive one.
        if not (isinstance(alpha, (int, float)) and (alpha > 0 or alpha == self.eps == 0)):
            raise ValueError(f"alpha={alpha!r}: the step size must be a number > 0")
        start = {True: "uniform", False: "none"}.get(random_start, random_start)
        if start not in STARTS:
            raise ValueError(f"random_start={random_start!r}: expected True, False or one of {', '.join(STARTS)}")
        self.alpha, self.steps, self.random_start, self.restarts = float(alpha), steps, start, restarts

    def _start(self, x):
        if self.random_start == "none":
            return x.clone()
        if self.random_start == "normal":
            return project(x + 0.001 * torch.randn_like(x), x, self.eps, self.norm, self.clip)
        if self.norm == "linf":
            return (x + torch.empty_like(x).uniform_(-self.eps, self.eps)).clamp(*self.clip)
        direction = torch.randn_like(x)
        direction = direction / _per_sample_norm(direction, "l2").clamp_min(1e-12)
        radius = self.eps * torch.rand((len(x),) + (1,) * (x.dim() - 1), device=x.device, dtype=x.dtype)
        return (x + radius * direction).clamp(*self.clip)

    def _run(self, x, y):
        x_adv = self._start(x)
        for _ in range(self.steps):
            grad, _ = self._grad(x_adv, y)
            x_adv = project(x_adv + self.alpha * _direction(grad, self.norm), x, self.eps, self.norm, self.clip)
        with torch.no_grad():
            logits, loss = self._objective(x_adv, y)
            fooled = logits.argmax(1) == y if self.targeted else logits.argmax(1) != y
        return x_adv, loss, fooled

    def _perturb(self, x, y):
        best, best_loss, best_fooled = self._run(x, y)
        for _ in range(self.restarts - 1):
            x_adv, loss, fooled = self._run(x, y)
            # A success beats any failure; between equals, the higher loss wins.
            better = (fooled & ~best_fooled) | ((fooled == best_fooled) & (loss > best_loss))
            best = torch.where(better.view(-1, *[1] * (x.dim() - 1)), x_adv, best)
            best_loss, best_fooled = torch.where(better, loss, best_loss), best_fooled | fooled
        return best


class CW(PGD):
    """CW-L-inf: PGD on the Carlini-Wagner margin loss (``PGD(loss="cw")``)."""

    name = "cw"

    def __init__(self, model, eps, alpha=None, steps=30, norm="linf", random_start=True, restarts=1,
                 targeted=False, num_classes=None, clip=PIXELS, logits=None):
        super().__init__(model, eps, alpha, steps, norm, random_start, restarts, "cw", targeted, num_classes, clip, logits)


class NeuronPGD(PGD):
    """The adaptive attack on SNS: PGD that also drives the most sensitive neurons of chosen layers
    away from their benign outputs.

    Per sample it ascends ``loss(f(x'), y) + weight * T(x')``, where ``T`` is the mean over the
    chosen layers of the mean ``metric`` distance (l1 by default; the definitions of
    :mod:`neurosens.reference`) between the benign and the adversarial output of each layer's
    top-k neurons. Layers are chosen as SNS chooses them (:func:`neurosens.sns.sns_layers`: "auto"
    or "all", "hidden", "logits", names, patterns), and so is k (a count or a fraction of each
    layer's neurons; SNS's default 0.3). The top-k are re-chosen at every step, on the whole batch,
    by the same distance between the benign and the current adversarial outputs, with SNS's own
    fused op (:func:`neurosens.ops.stabilize`): the attack aims at whichever neurons SNS would
    stabilize on that batch at that moment, rather than at a set frozen before the attack moved.
    ``feature_only`` (:class:`FeaturePGD`) ascends ``weight * T`` alone, without the classification
    loss. ``channel_dim`` and ``output_index`` are those of :class:`~neurosens.sns.SNSRegularizer`.
    """

    name = "neuron-pgd"

    def __init__(self, model, eps, alpha=None, steps=10, norm="linf", random_start=True, restarts=1, loss="ce",
                 targeted=False, num_classes=None, clip=PIXELS, logits=None, layers=SNSConfig.layers, k=SNSConfig.k,
                 weight=1.0, metric=SNSConfig.metric, feature_only=False, channel_dim=None, output_index=None):
        super().__init__(eager(model), eps, alpha, steps, norm, random_start, restarts, loss, targeted, num_classes, clip,
                         logits)  # eager: its layers' hooks must fire
        who = type(self).__name__
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{who}: weight={weight!r} must be a finite number >= 0")
        if feature_only and weight == 0:
            raise ValueError(f"{who}: weight=0 leaves the feature-only attack nothing to ascend; give weight > 0")
        check_metric(metric, who)
        self._layers = sns_layers(model, layers)
        self._by_rule = isinstance(layers, str) and layers in LAYER_PRESETS  # layers that never run are left out
        self._dims = NeuronDims(model, self._layers, channel_dim, who)
        for name in self._layers:
            resolve_k(k, self._dims.count(name), f"{who} layer {name!r}")
        self.layers, self.k, self.weight, self.metric = list(self._layers), k, float(weight), metric
        self.feature_only, self.output_index = bool(feature_only), output_index
        self._benign = None

    def _forward(self, x):
        """The logits and ``{layer: output}`` of the chosen layers, with their graphs."""
        outputs = {name: [] for name in self._layers}
        with LayerHooks(self._layers, lambda name, t: outputs[name].append((t, version_of(t))), self.output_index) as hooks:
            logits = self._logits(x)
        if self._by_rule:
            for name in drop_silent_layers(self._layers, hooks.calls, type(self).__name__):
                del outputs[name]
            self.layers = list(self._layers)
        hooks.check_ran()
        for name, outs in outputs.items():
            if len(outs) > 1:
                raise RuntimeError(f"{type(self).__name__}: layer {name!r} ran {len(outs)} times in one forward; "
                                   "choose layers that run once per forward")
            check_unchanged(name, *outs[0], type(self).__name__)
        return logits, {name: outs[0][0] for name, outs in outputs.items()}

    def _feature_term(self, outputs):
        """Per sample, the mean over layers of the mean distance of each layer's top-k neurons from
        their benign outputs (the neurons chosen on the whole batch)."""
        terms = []
        for name, b in outputs.items():
            a = self._benign[name]
            cdim = self._dims(name, b)
            k = resolve_k(self.k, b.shape[cdim], f"{type(self).__name__} layer {name!r}")
            batch_mean, chosen = stabilize(a, b, k=k, metric=self.metric, select_metric=self.metric, channel_dim=cdim,
                                           return_indices=True)
            per_sample = neuron_distance_per_sample(a, b, self.metric, cdim).index_select(1, chosen).mean(1)
            # The values are the per-sample distances; adding (batch mean - itself, detached) to each
            # leaves them unchanged and makes the gradient of their sum N times the batch mean's,
            # which is the sum's own gradient, taken in one fused pass.
            terms.append(per_sample + (batch_mean - batch_mean.detach()))
        return torch.stack(terms).mean(0)

    def _objective(self, x_adv, y):
        logits, outputs = self._forward(x_adv)
        feature = self.weight * self._feature_term(outputs)
        return logits, feature if self.feature_only else self._loss(logits, y) + feature

    def _perturb(self, x, y):
        with torch.no_grad():
            _, self._benign = self._forward(x)
        try:
            return super()._perturb(x, y)
        finally:
            self._benign = None

    def objective(self, x, x_adv, y):
        """The per-sample objective the attack ascends at ``x_adv``, for benign ``x`` and labels
        ``y`` (the target, for a targeted attack), in eval mode and without gradients."""
        with eval_mode(self.model), torch.no_grad():
            _, self._benign = self._forward(x)
            try:
                return self._objective(x_adv, y)[1]
            finally:
                self._benign = None


class FeaturePGD(NeuronPGD):
    """The pure-feature variant of :class:`NeuronPGD`: it ascends only ``weight`` times the
    distance of the chosen layers' top-k neurons from their benign outputs, no classification loss."""

    name = "feature-pgd"

    def __init__(self, model, eps, alpha=None, steps=10, norm="linf", random_start=True, restarts=1, targeted=False,
                 num_classes=None, clip=PIXELS, logits=None, layers=SNSConfig.layers, k=SNSConfig.k, weight=1.0,
                 metric=SNSConfig.metric, channel_dim=None, output_index=None):
        super().__init__(model, eps, alpha, steps, norm, random_start, restarts, "ce", targeted, num_classes, clip, logits,
                         layers, k, weight, metric, True, channel_dim, output_index)


def require_torchattacks(what="AutoAttack"):
    """The torchattacks module, or :class:`~neurosens.env.MissingDependency` saying how to install it."""
    return require("torchattacks", what, "torchattacks", "pip install 'neurosens[attacks]'")


def pixels_only(clip, who):
    """Refuse bounds other than [0, 1], the only ones torchattacks' attacks know."""
    if check_clip(clip) != PIXELS:
        raise ValueError(f"{who}: clip={clip!r}: torchattacks' {who} works in [0, 1] only; "
                         "normalize inside the model (neurosens.models.Normalize)")


class AutoAttack(Attack):
    """AutoAttack (APGD-CE, APGD-T, FAB-T, Square; the "standard" version) via ``torchattacks``,
    an optional dependency: ``pip install 'neurosens[attacks]'``. It works in
    [0, 1] only."""

    name = "autoattack"

    def __init__(self, model, eps, norm="linf", num_classes=10, version="standard", seed=0, clip=PIXELS, logits=None):
        pixels_only(clip, "AutoAttack")
        super().__init__(model, eps, norm, "ce", False, num_classes, logits=logits)
        torchattacks = require_torchattacks()
        target = model if self.logits is None else LogitsModel(model, self.logits)
        self._attack = torchattacks.AutoAttack(target, norm={"linf": "Linf", "l2": "L2"}[norm], eps=self.eps,
                                               version=version, n_classes=num_classes, seed=seed)
        self.version, self.seed = version, seed

    def __call__(self, x, y, target=None):
        if target is not None:
            raise ValueError("AutoAttack (standard) is untargeted in its call; do not pass target=")
        return super().__call__(x, y)

    def _perturb(self, x, y):
        return self._attack(x, y)


class Square(Attack):
    """The Square attack (Andriushchenko et al.) via ``torchattacks``: black-box, it sees only the
    model's outputs, never a gradient, so a white-box attack that does worse than it is a sign of
    gradient masking. ``queries`` model calls per sample and restart, margin loss, [0, 1] only."""

    name = "square"

    def __init__(self, model, eps, norm="linf", queries=1000, restarts=1, seed=0, clip=PIXELS, logits=None):
        pixels_only(clip, "Square")
        super().__init__(model, eps, norm, "cw", False, logits=logits)
        if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
            raise ValueError(f"Square: queries={queries!r} must be an integer >= 1")
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"Square: restarts={restarts!r} must be an integer >= 1")
        torchattacks = require_torchattacks("the Square attack")
        target = model if self.logits is None else LogitsModel(model, self.logits)
        self._attack = torchattacks.Square(target, norm={"linf": "Linf", "l2": "L2"}[norm], eps=self.eps,
                                           n_queries=queries, n_restarts=restarts, seed=seed)
        self.queries, self.restarts, self.seed = queries, restarts, seed

    def __call__(self, x, y, target=None):
        if target is not None:
            raise ValueError("Square is untargeted here; do not pass target=")
        return super().__call__(x, y)

    def _perturb(self, x, y):
        return self._attack(x, y)


#: Name -> class, for building attacks from configuration.
ATTACKS = {"fgsm": FGSM, "pgd": PGD, "cw": CW, "autoattack": AutoAttack, "square": Square, "neuron-pgd": NeuronPGD,
           "feature-pgd": FeaturePGD}
#: The options :func:`make_attack` passes on to the attacks that take them, beyond the shared ones.
EXTRA_OPTIONS = {"neuron-pgd": ("layers", "k", "weight", "metric", "loss"), "feature-pgd": ("layers", "k", "weight", "metric"),
                 "square": ("queries",)}


def make_attack(name, model, eps, norm="linf", alpha=None, steps=None, restarts=1, num_classes=10, seed=0, clip=PIXELS,
                logits=None, **options):
    """An attack of :data:`ATTACKS` by name, given the options that kind takes: FGSM only ``norm``,
    AutoAttack ``norm``, ``num_classes`` and ``seed``, Square ``norm``, ``restarts``, ``seed``
    and ``queries``, PGD, CW and the neuron-targeted attacks the step size, steps (None: the
    attack's default) and restarts, the neuron-targeted ones also ``layers``, ``k``, ``weight``
    and ``metric``, and neuron-pgd its ``loss`` ("ce" or "cw") (:data:`EXTRA_OPTIONS`); all take
    the bounds ``clip`` and ``logits``."""
    if name not in ATTACKS:
        raise ValueError(f"attack {name!r} is unknown; expected one of {', '.join(ATTACKS)}")
    unknown = sorted(set(options) - set(EXTRA_OPTIONS.get(name, ())))
    if unknown:
        takes = ", ".join(EXTRA_OPTIONS.get(name, ())) or "none"
        raise ValueError(f"attack {name!r} takes no option {', '.join(unknown)} (its extra options: {takes})")
    if name == "fgsm":
        return FGSM(model, eps, norm, clip=clip, logits=logits)
    if name == "autoattack":
        return AutoAttack(model, eps, norm, num_classes=num_classes, seed=seed, clip=clip, logits=logits)
    if name == "square":
        return Square(model, eps, norm, restarts=restarts, seed=seed, clip=clip, logits=logits, **options)
    return ATTACKS[name](model, eps, alpha, norm=norm, restarts=restarts, clip=clip, logits=logits,
                        **({} if steps is None else {"steps": steps}), **options)
