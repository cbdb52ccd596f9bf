"""One dropout mask for a benign input and its adversarial twin.

In training mode every row of a batch draws its own dropout mask, so the outputs of x and x'
differ by dropout noise as well as by the inputs, and a term that compares them (SNS, logit
pairing) would partly measure that noise. Inside :class:`SharedDropout` every ``nn.Dropout`` and
``nn.Dropout1d/2d/3d`` in training mode gives both members of a pair one mask:

* ``forward="joint"``: one forward of ``[x; x']`` draws each mask for the first half of the rows
  and uses it for both halves;
* ``forward="separate"``: two forwards, ``x`` then ``x'``; the second reuses the masks of the
  first, call by call.

Dropout that no module boundary exposes keeps independent masks: the attention-weight dropout of
``nn.MultiheadAttention``, alpha dropout, and ``F.dropout`` called inside a ``forward``. A
warning names the layers of the first two kinds.
"""
import contextlib
import warnings

from torch import nn

#: How a benign batch and its adversarial twin run: one forward of [x; x_adv], or two.
FORWARDS = ("joint", "separate")
_SHARED = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


def unshared_dropout(model):
    """Names of the layers of ``model`` whose dropout :class:`SharedDropout` cannot share."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.AlphaDropout, nn.FeatureAlphaDropout)) and module.p > 0:
            names.append(name)
        elif isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            names.append(name)
    return names


class SharedDropout:
    """Gives a benign batch and its adversarial twin one dropout mask (module doc)::

        shared = SharedDropout(model)
        with shared("joint"):
            model(torch.cat([x, x_adv]))

    Afterwards ``ran`` tells whether any dropout in training mode ran, and ``forwards`` how many
    forwards of ``model`` there were.
    """

    def __init__(self, model, where="SNS"):
        self.model, self.where = model, where
        self.modules = [m for m in model.modules() if type(m) in _SHARED]  # subclasses may have their own forward
        self.unshared = unshared_dropout(model)
        self.ran, self.forwards = False, 0
        self._warned = False

    @contextlib.contextmanager
    def __call__(self, forward="joint"):
        if forward not in FORWARDS:
            raise ValueError(f"{self.where}: forward={forward!r} is unknown; expected one of {', '.join(FORWARDS)}")
        self.ran, self.forwards = False, 0
        self._masks = {}  # (module, call) -> mask of the latest drawing forward
        self._calls = {}  # module -> calls in the current forward
        if self.unshared and not self._warned and self.model.training:
            self._warned = True
            warnings.warn(f"{self.where}: the dropout of {', '.join(self.unshared)} draws its own mask for the benign and "
                          "the adversarial input (it is inside the layer's computation), so its noise enters the "
                          "difference between them; set it to 0 to compare the inputs alone", stacklevel=4)
        handle = self.model.register_forward_pre_hook(self._new_forward)
        for module in self.modules:
            module.forward = self._dropout_of(module, forward)
        try:
            yield self
        finally:
            for module in self.modules:
                del module.forward
            handle.remove()

    def _new_forward(self, module, args):
        self.forwards += 1
        self._calls = {}

    def _dropout_of(self, module, pairing):
        def forward(x):
            if not module.training or module.p == 0:
                return x
            self.ran = True
            call = self._calls.get(module, 0)
            self._calls[module] = call + 1
            key = (module, call)
            if pairing == "separate" and self.forwards % 2 == 0 and key in self._masks:
                mask = self._masks[key]
                if mask.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{self.where}: the adversarial forward has {x.shape[0]} rows where the benign "
                                       f"one had {mask.shape[0]}; the two batches of a pair must have one size")
            else:
                rows = x.shape[0] // 2 if pairing == "joint" and x.shape[0] % 2 == 0 else x.shape[0]
                shape = (rows, *x.shape[1:]) if type(module) is nn.Dropout else (rows, x.shape[1]) + (1,) * (x.dim() - 2)
                mask = x.new_empty(shape).bernoulli_(1 - module.p)
                if rows != x.shape[0]:
                    mask = mask.repeat(2, *([1] * (mask.dim() - 1)))
                self._masks[key] = mask
            return x * mask * (1 / (1 - module.p)) if module.p < 1 else x * 0

        return forward
