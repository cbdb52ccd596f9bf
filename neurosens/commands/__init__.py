"""Subcommands of the `neurosens` command line, one module each, and the option types they share.

Each type checks its value while the command line is parsed, so a bad value is reported as one
line naming its option before any model or data is loaded.
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
