"""Subcommands of the `neurosens` command line, one module each, and the option types they share.

Each type checks its value while the command line is parsed, so a bad value is reported as one
line naming its option before any model or data is loaded. The ``add_*`` functions declare the
options several commands share, so each is spelled and explained the same way everywhere.
"""
import argparse
import math
from fractions import Fraction
from pathlib import Path


def number(text):
    """A float, also written as a fraction such as 8/255."""
    try:
        return float(Fraction(text)) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _bounded(parse, test, rule):
    def convert(text):
        value = parse(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    convert.__name__ = rule
    return convert


def _integer(text):
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


#: An integer >= 1 (counts, sizes, steps, epochs, threads).
positive_int = _bounded(_integer, lambda v: v >= 1, "an integer >= 1")
#: An integer >= 0 (where 0 has a stated meaning, such as "all").
count_or_zero = _bounded(_integer, lambda v: v >= 0, "an integer >= 0")
#: A finite number >= 0 (attack budgets, weights).
non_negative = _bounded(number, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
#: A finite number > 0 (learning rates, step sizes, factors).
positive = _bounded(number, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
#: A fraction of a run, strictly between 0 and 1.
fraction = _bounded(number, lambda v: 0 < v < 1, "a fraction in (0, 1)")


def device(text):
    """A device torch knows and this machine has."""
    from ..env import default_device

    try:
        return str(default_device(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def out_dir(text):
    """A folder to write into: it may exist, but not as a file."""
    if not text.strip():
        raise argparse.ArgumentTypeError("give a folder name (an empty one would write into the current folder)")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file, not a folder")
    return text


def out_file(text):
    """A file to write: its folder must exist, and it must not be a folder itself."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: the folder {path.parent} does not exist")
    return text


#: How every command takes an attack budget.
EPS_HELP = "attack budget in pixel units [0, 1], e.g. 0.3 or 8/255"


def add_model(parser, many=False):
    """The checkpoint(s) as positional arguments; ``--model``/``--models`` say so."""
    parser.add_argument("models" if many else "model", nargs="+" if many else None, metavar="MODEL",
                        help="model.pt or checkpoint.pt written by `neurosens train`" + (" (one or more)" if many else ""))
    for old in ("--model", "--models"):
        renamed(parser, old, "the positional MODEL" + (" ..." if many else ""), nargs="*")


def add_eps(parser, default="the eps the model was trained with", value=None):
    parser.add_argument("--eps", type=non_negative, default=value, help=f"{EPS_HELP} (default: {default})")


def add_data(parser, default="the one the model was trained on"):
    """The data set and the folder holding it."""
    from ..data import DATASETS

    parser.add_argument("--data", choices=sorted(DATASETS), help=f"data set (default: {default})")
    add_root(parser)


def add_root(parser):
    parser.add_argument("--root", help="data root, the folder holding the data sets (default: $NEUROSENS_DATA or ./data)")
    renamed(parser, "--data-root", "--root")


def add_samples(parser, default):
    """How many images a command reads: the first N of the split, 0 for all (see :func:`first_samples`)."""
    shown = "all" if default == 0 else f"{default}, or all of a smaller split"
    parser.add_argument("-n", "--samples", type=count_or_zero, default=None, metavar="N",
                        help=f"use the first N images of the split, 0 for all (default: {shown})")
    parser.set_defaults(samples_default=default)
    renamed(parser, "--num", "-n/--samples")


def add_layers(parser, help_prefix="layers"):
    parser.add_argument("--layers", type=layer_list, default="auto", metavar="LAYER[,LAYER...]",
                        help=f"{help_prefix}: comma-separated names, glob patterns (quote them: 'layer3.*.conv2') or "
                             "module types such as nn.Conv2d, or auto (default)")


def add_logits(parser):
    parser.add_argument("--logits", type=logits_key,
                        help="where the model's output holds the logits when it is not a tensor: a key, or an integer index")


def layer_list(text):
    """``auto``, or comma-separated layer names, glob patterns and ``nn.<Module>`` types."""
    from torch import nn

    entries = [entry.strip() for entry in text.split(",") if entry.strip()]
    if not entries:
        raise argparse.ArgumentTypeError("give layer names, patterns or module types, separated by commas, or auto")
    if entries == ["auto"]:
        return "auto"
    specs = []
    for entry in entries:
        if entry.startswith("nn."):
            cls = getattr(nn, entry[3:], None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise argparse.ArgumentTypeError(f"torch.nn has no module type {entry[3:]!r}")
            specs.append(cls)
        else:
            specs.append(entry)
    return specs


def logits_key(text):
    """An integer index, or else a key."""
    try:
        return int(text)
    except ValueError:
        return text


def renamed(parser, old, new, nargs=None):
    """Accept ``old`` only to say, as the parser's one-line error, that ``new`` replaced it."""

    class Renamed(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            parser.error(f"{option_string} is now {new}")

    parser.add_argument(old, action=Renamed, nargs=nargs, help=argparse.SUPPRESS)


def check_at_most(flag, count, images, there, zero="0 for all"):
    """A count of images an option gives must not pass the ``images`` there are (``there`` says
    so in words): refused, not clipped."""
    if count > images:
        raise ValueError(f"{flag} {count}: {there}; give at most that{', or ' + zero if zero else ''}")


def first_samples(dataset, args):
    """The first ``-n`` images of ``dataset`` (0: all of them). More than it has is refused when
    given; the command's default takes what a smaller split has."""
    if args.samples is None:
        return dataset.first(args.samples_default)
    check_at_most("-n/--samples", args.samples, len(dataset), f"the {dataset.name} split has {len(dataset)} images")
    return dataset.first(args.samples)
