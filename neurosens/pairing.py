"""One dropout mask for a benign input and its adversarial twin.

In training mode every row of a batch draws its own dropout mask, so the outputs of x and x'
differ by dropout noise as well as by the inputs, and a term that compares them (SNS, logit
pairing) would partly measure that noise. Inside :class:`SharedDropout` every ``nn.Dropout`` and
``nn.Dropout1d/2d/3d`` in training mode gives both members of a pair one mask:

* ``forward="joint"``: one forward of ``[x; x']`` draws each mask for the first half of the rows
  and uses it for both halves;
* ``forward="separate"``: two forwards, ``x`` then ``x'``; the second reuses the masks of the
  first, call by call.

Other dropout keeps independent masks, and a warning names its layers: the attention-weight
dropout of ``nn.MultiheadAttention``, alpha dropout, other dropout-like modules (stochastic depth,
drop path), dropout whose input does not hold the batch on dim 0 (inside a sequence-first
transformer), and a subclass with a ``forward`` of its own. ``F.dropout`` called inside a
``forward`` cannot be seen at all.
"""
import contextlib
import warnings

from torch import nn

from .capture import forward_rows
from .layers import sequence_first_part

#: How a benign batch and its adversarial twin run: one forward of [x; x_adv], or two.
FORWARDS = ("joint", "separate")
#: Dropout modules whose masks are shared, with the dims of their batched input (0: any).
_SHARED = {nn.Dropout: 0, nn.Dropout1d: 3, nn.Dropout2d: 4, nn.Dropout3d: 5}
#: Words in the class names of other dropout-like modules (stochastic depth, drop path, drop block).
_DROPOUT_LIKE = ("dropout", "droppath", "stochasticdepth", "dropblock")


def _shared_kind(module):
    """The class of :data:`_SHARED` whose forward ``module`` runs (not one of its own, nor one set on
    the instance), or None."""
    if "forward" in vars(module):
        return None
    return next((c for c in _SHARED if isinstance(module, c) and type(module).forward is c.forward), None)


def split_dropout(model):
    """``(shared, unshared)``: the dropout modules of ``model`` whose masks :class:`SharedDropout`
    shares, and the names of the dropout-like layers it cannot share (inside attention, alpha
    dropout, other kinds, or in a part that keeps the batch off dim 0)."""
    shared, unshared = [], []
    for name, module in model.named_modules():
        rate = getattr(module, "p", None) if not isinstance(module, nn.MultiheadAttention) else module.dropout
        rate = rate if isinstance(rate, (int, float)) else getattr(module, "drop_prob", 1)
        if not rate:
            continue
        kind = _shared_kind(module)
        if kind is not None and sequence_first_part(model, name) is None:
            shared.append(module)
        elif kind is not None or isinstance(module, nn.MultiheadAttention) or \
                any(word in type(module).__name__.lower() for word in _DROPOUT_LIKE):
            unshared.append(name)
    return shared, unshared


class SharedDropout:
    """Gives a benign batch and its adversarial twin one dropout mask (module doc)::

        shared = SharedDropout(model)
        with shared("joint"):
            model(torch.cat([x, x_adv]))

    Afterwards ``pairing`` is the block's argument, ``rows`` the batch size of each forward of
    ``model`` in it (see :func:`~neurosens.capture.forward_rows`), and ``ran`` whether any dropout
    in training mode ran.
    """

    def __init__(self, model, where="SNS"):
        self.model, self.where = model, where
        self.modules, self.unshared = split_dropout(model)
        self.pairing, self.rows, self.ran = None, [], False
        self._warned = set()

    @property
    def forwards(self):
        """How many forwards of the model the last block saw."""
        return len(self.rows)

    def _warn_once(self, names, why):
        names = [n for n in names if n not in self._warned]
        if names:
            self._warned.update(names)
            warnings.warn(f"{self.where}: the dropout of {', '.join(names)} draws its own mask for the benign and the "
                          f"adversarial input ({why}), so its noise enters the difference between them; set it to 0 "
                          "to compare the inputs alone", stacklevel=5)

    @contextlib.contextmanager
    def __call__(self, forward="joint"):
        if forward not in FORWARDS:
            raise ValueError(f"{self.where}: forward={forward!r} is unknown; expected one of {', '.join(FORWARDS)}")
        self.pairing, self.rows, self.ran = forward, [], False
        self._masks = {}  # (module, call) -> mask of the latest drawing forward
        self._calls = {}  # module -> calls in the current forward
        if self.unshared and self.model.training:
            self._warn_once(self.unshared, "it is not a module SNS can reach, or its part keeps the batch off dim 0")
        handle = self.model.register_forward_pre_hook(self._new_forward, with_kwargs=True)
        names = {module: name for name, module in self.model.named_modules()}
        for module in self.modules:
            module.forward = self._dropout_of(module, names[module], forward)
        try:
            yield self
        finally:
            for module in self.modules:
                del module.forward
            handle.remove()

    def _new_forward(self, module, args, kwargs):
        self.rows.append(forward_rows(args, kwargs))
        self._calls = {}

    def _dropout_of(self, module, name, pairing):
        batched = _SHARED[_shared_kind(module)]

        def forward(x):
            if not module.training or module.p == 0:
                return x
            rows = self.rows[-1] if self.rows else None  # None: called outside a forward of the model
            if rows is not None and x.shape[0] != rows:
                # Its batch is not on dim 0 (the model moved it), so the halves cannot be found.
                self._warn_once([name], f"its input of shape {list(x.shape)} does not hold the batch of {rows} on dim 0")
                return type(module).forward(module, x)
            self.ran = True
            call = self._calls.get(module, 0)
            self._calls[module] = call + 1
            key = (module, call)
            if pairing == "separate" and len(self.rows) % 2 == 0 and key in self._masks:
                mask = self._masks[key]
                if mask.shape[0] != x.shape[0]:
                    raise RuntimeError(f"{self.where}: the adversarial forward has {x.shape[0]} rows where the benign "
                                       f"one had {mask.shape[0]}; the two batches of a pair must have one size")
            else:
                rows = x.shape[0] // 2 if pairing == "joint" and x.shape[0] % 2 == 0 else x.shape[0]
                if batched == 0:
                    shape = (rows, *x.shape[1:])
                elif x.dim() == batched - 1:  # unbatched input: dim 0 holds the channels, each dropped whole
                    shape = (rows,) + (1,) * (x.dim() - 1)
                else:
                    shape = (rows, x.shape[1]) + (1,) * (x.dim() - 2)
                mask = x.new_empty(shape).bernoulli_(1 - module.p)
                if rows != x.shape[0]:
                    mask = mask.repeat(2, *([1] * (mask.dim() - 1)))
                self._masks[key] = mask
            return x * mask * (1 / (1 - module.p)) if module.p < 1 else x * 0

        return forward
