"""Training methods: standard, PGD-AT (Madry et al.), TRADES, adversarial logit pairing and SNS,
each a loss function::

    loss_fn(model, x, y, attack) -> (loss, logs)

``model`` is the network being trained (wrapped in DistributedDataParallel under torchrun: call it
for every forward whose gradients should be synchronized); ``attack`` is the training attack (a
:class:`~neurosens.attacks.PGD` on the bare module, already at the current eps), whose
``attack(x, y)`` gives the adversarial batch and whose ``logits`` attribute, when it has one, says
where the model's output holds the logits (:mod:`neurosens.outputs`); ``loss`` is a scalar tensor to minimize and ``logs``
a dict of scalar tensors (batch means, e.g. ``{"adv_acc": ...}``) averaged into the epoch metrics.
A new method is one more entry of :data:`METHODS` (a factory taking keyword options and
returning such a function; a function with ``state_dict``/``load_state_dict`` has that state
checkpointed too).
"""
import torch
import torch.nn.functional as F

from .attacks import PGD
from .capture import eval_mode
from .evaluation import accuracy
from .layers import unwrap
from .outputs import logits_of
from .pairing import SharedDropout
from .sns import SNSConfig, SNSRegularizer


def _logits(model, x, attack):
    """The logits of ``model(x)``, found where the training attack says they are."""
    return logits_of(model(x), getattr(attack, "logits", None))


def standard_loss(model, x, y, attack):
    """Cross-entropy on clean inputs; the attack is not used."""
    logits = _logits(model, x, attack)
    return F.cross_entropy(logits, y), {"acc": accuracy(logits, y)}


def pgd_at_loss(model, x, y, attack):
    """Madry et al.: cross-entropy on the PGD adversarial batch only."""
    logits = _logits(model, attack(x, y), attack)
    return F.cross_entropy(logits, y), {"adv_acc": accuracy(logits, y)}


def trades_loss(beta=6.0):
    """TRADES (Zhang et al.): CE(f(x), y) + beta * KL(f(x) || f(x')), where x' maximizes the KL term
    by PGD with the training attack's eps, step and steps, started at x + 0.001 * N(0, 1)."""
    if beta < 0:
        raise ValueError(f"beta={beta!r}: the TRADES weight must be >= 0")

    def loss_fn(model, x, y, attack):
        with torch.no_grad(), eval_mode(attack.model):
            p_clean = F.softmax(_logits(attack.model, x, attack), 1)

        def kl_to_clean(logits, _):
            return F.kl_div(F.log_softmax(logits, 1), p_clean, reduction="none").sum(1)

        inner = PGD(attack.model, attack.eps, attack.alpha, attack.steps, attack.norm, random_start="normal", loss=kl_to_clean,
                    clip=attack.clip, logits=getattr(attack, "logits", None))
        x_adv = inner(x, y)
        logits, logits_adv = _logits(model, x, attack), _logits(model, x_adv, attack)
        ce = F.cross_entropy(logits, y)
        kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits, 1), reduction="batchmean")
        return ce + beta * kl, {"acc": accuracy(logits, y), "adv_acc": accuracy(logits_adv, y),
                                "ce": ce.detach(), "kl": kl.detach()}

    return loss_fn


#: Distances of adversarial logit pairing between a benign and an adversarial logit vector.
ALP_DISTANCES = ("l1", "l2")


def alp_loss(lam=1.0, distance="l2"):
    """Adversarial logit pairing (after Kannan et al.): CE(f(x'), y) + lam * d(f(x), f(x')) on the
    PGD batch x', with no hidden-layer term; d is the mean over the batch of the mean absolute logit
    difference ("l1", the SNS L1 term on the logits layer with every neuron) or of the Euclidean
    distance between the logit vectors ("l2"). Both inputs go through one forward of [x; x'], as in
    SNS, with one dropout mask for both (:mod:`neurosens.pairing`)."""
    if distance not in ALP_DISTANCES:
        raise ValueError(f"distance={distance!r} is unknown; expected one of {', '.join(ALP_DISTANCES)}")
    if not lam >= 0:
        raise ValueError(f"lam={lam!r}: the pairing weight must be >= 0")

    shared = {}  # the model's SharedDropout, made on the first call

    def loss_fn(model, x, y, attack):
        x_adv = attack(x, y)
        root = unwrap(model)
        if shared.get("model") is not root:
            shared.update(model=root, dropout=SharedDropout(root, "adversarial logit pairing"))
        with shared["dropout"]("joint"):
            logits, logits_adv = _logits(model, torch.cat([x, x_adv]), attack).chunk(2)
        diff = logits - logits_adv
        pair = (diff.abs().mean(1) if distance == "l1" else torch.linalg.vector_norm(diff, dim=1)).mean()
        ce = F.cross_entropy(logits_adv, y)
        return ce + lam * pair, {"acc": accuracy(logits, y), "adv_acc": accuracy(logits_adv, y), "ce": ce.detach(),
                                 "pair": pair.detach()}

    return loss_fn


class SNSLoss:
    """SNS training: the adversarial cross-entropy plus ``lam`` times the stabilizing term of the
    top-k most sensitive neurons of the chosen layers (see :class:`~neurosens.sns.SNSRegularizer`),
    plus ``clean_weight`` times the clean cross-entropy.

    ``adv_examples="correct"`` keeps in the adversarial cross-entropy only the examples the model
    classifies right on the benign input; the mean is still over the whole batch (the others count
    0), so that term weighs less, against ``lam``, while clean accuracy is low. With ``lam=0``, ``clean_weight=0`` and all examples no
    benign forward is needed, and a step is exactly a PGD-AT step. ``forward="joint"`` (the
    default) runs the benign and adversarial batches as one forward of ``[x; x_adv]``,
    ``"separate"`` as two; :mod:`neurosens.sns` says what each means for BatchNorm. The options
    are an :class:`~neurosens.sns.SNSConfig`, or its fields as keywords.
    """

    def __init__(self, model, config=None, **options):
        config = (config if config is not None else SNSConfig(**options)).check()
        self.regularizer = SNSRegularizer(model, **config.options("regularizer"))
        self.clean_weight, self.adv_examples, self.forward = float(config.clean_weight), config.adv_examples, config.forward

    def __call__(self, model, x, y, attack):
        reg = self.regularizer
        x_adv = attack(x, y)
        if reg.lam == 0 and self.clean_weight == 0 and self.adv_examples == "all":
            logits_adv = _logits(model, x_adv, attack)
            return F.cross_entropy(logits_adv, y), {"adv_acc": accuracy(logits_adv, y)}
        with reg.capture(self.forward):
            if self.forward == "joint":
                logits, logits_adv = _logits(model, torch.cat([x, x_adv]), attack).chunk(2)
            else:
                # A detached benign side needs no graph unless the clean cross-entropy uses it.
                with torch.set_grad_enabled(not (reg.detach_benign and self.clean_weight == 0)):
                    logits = _logits(model, x, attack)
                logits_adv = _logits(model, x_adv, attack)
        ce_each = F.cross_entropy(logits_adv, y, reduction="none")
        if self.adv_examples == "correct":
            ce_each = ce_each * (logits.argmax(1) == y).to(ce_each.dtype)
        ce = ce_each.mean()
        sns = reg.loss()
        loss = ce + sns
        logs = {"acc": accuracy(logits, y), "adv_acc": accuracy(logits_adv, y), "ce": ce.detach(), "sns": sns.detach()}
        if self.clean_weight:
            clean_ce = F.cross_entropy(logits, y)
            loss = loss + self.clean_weight * clean_ce
            logs["clean_ce"] = clean_ce.detach()
        return loss, logs

    def state_dict(self):
        return self.regularizer.state_dict()

    def load_state_dict(self, state):
        self.regularizer.load_state_dict(state)


#: Method name -> factory(**options) -> loss_fn(model, x, y, attack) -> (loss, logs).
METHODS = {
    "standard": lambda **options: standard_loss,
    "pgd_at": lambda **options: pgd_at_loss,
    "trades": lambda beta=6.0, **options: trades_loss(beta),
    "alp": lambda alp_lam=1.0, alp_distance="l2", **options: alp_loss(alp_lam, alp_distance),
    "sns": lambda model, sns=None, **options: SNSLoss(model, sns),
}


def make_loss(method, **options):
    """The loss function of a training method (see :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; expected one of {', '.join(METHODS)}")
    return METHODS[method](**options)
