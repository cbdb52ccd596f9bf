"""Where the logits are in a model's output: the one rule every attack, measurement, intervention
and training loss follows.

``logits=None`` (the default) takes the output itself, which must then be a tensor; a string is a
key (``output["logits"]``), an int an index (``output[0]``), and a callable maps the output to the
logits (``lambda out: out.logits``).
"""
import torch
from torch import nn


def check_logits(logits, who):
    """``logits`` if it is None, a key, an index or a callable; else a ValueError naming ``who``."""
    if logits is None or callable(logits) or isinstance(logits, str) or (isinstance(logits, int) and not isinstance(logits, bool)):
        return logits
    raise ValueError(f"{who}: logits={logits!r}: say where the logits are with a key (str), an index (int) or a "
                     "callable taking the model's output")


def logits_of(output, logits=None, who="model"):
    """The logits tensor in ``output``, found as ``logits`` says (see the module's rule)."""
    if logits is None:
        if isinstance(output, torch.Tensor):
            return output
        keys = f" with keys {', '.join(map(repr, output))}" if isinstance(output, dict) else ""
        raise ValueError(f"{who}: the model returned a {type(output).__name__}{keys}, not a logits tensor; "
                         "say where the logits are with logits= (a key, an index or a callable)")
    if isinstance(output, torch.Tensor) and not callable(logits):
        # Indexing the logits tensor itself would silently pick one sample's row.
        raise ValueError(f"{who}: logits={logits!r} was given, but the model returned a tensor, which is taken as the "
                         "logits; leave logits out")
    try:
        found = logits(output) if callable(logits) else output[logits]
    except (KeyError, IndexError, TypeError) as err:
        raise ValueError(f"{who}: logits={logits!r} finds nothing in the model's {type(output).__name__} output "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(found, torch.Tensor):
        raise ValueError(f"{who}: logits={logits!r} gives a {type(found).__name__}, not a tensor")
    return found


class LogitsModel(nn.Module):
    """``model`` whose forward returns only its logits, for code that calls a model directly (such
    as torchattacks)."""

    def __init__(self, model, logits=None):
        super().__init__()
        self.model, self.logits = model, check_logits(logits, "LogitsModel")

    def forward(self, x):
        return logits_of(self.model(x), self.logits)
