"""Command-line contract shared by every script: flags validated at parse time, one sentence per user error.

Every script builds its parser with ``ArgumentParser`` from here and gives each numeric flag one of the
``type=`` validators below, so a bad value (negative, zero, NaN, out of range) is refused while parsing, before
any model is loaded or any file is written. ``ArgumentParser.error`` prints ``error: <one sentence>`` and exits
with status 2 (argparse's default would print the usage block too).
"""
import argparse
import math
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's error contract: one sentence on stderr, exit status 2, nothing else."""

    def error(self, message):
        text = message.rstrip(".")
        print(f"error: {text}; see {self.prog} --help.", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        # argparse drops a "--" value (`--steps=--`) without calling type=, leaving [] where one value belongs
        namespace, extras = super().parse_known_args(args, namespace)
        for action in self._actions:
            if not action.option_strings or type(action) is not argparse._StoreAction:
                continue
            value = getattr(namespace, action.dest, None)
            if value is action.default or not isinstance(value, list):
                continue
            if (action.nargs is None and (action.type is not None or action.choices is not None)) or not value:
                self.error(f"argument {'/'.join(action.option_strings)}: expected a value, got '--'")
        return namespace, extras


def _number(text, kind):
    try:
        return kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None


def _finite(text):
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text):
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text):
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def finite_float(text):
    return _finite(text)


def positive_float(text):
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonneg_float(text):
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    return value


def probability(text):
    """A number in [0, 1]."""
    value = _finite(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}")
    return value


def int_in(lo, hi):
    """type= validator for an integer in [lo, hi]."""
    def check(text):
        value = _number(text, int)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected an integer between {lo} and {hi}, got {text!r}")
        return value
    check.__name__ = f"int_in_{lo}_{hi}"
    check.bounds = (lo, hi)  # read by the CLI property test to generate out-of-range values
    return check


def float_in(lo, hi):
    """type= validator for a finite number in [lo, hi]."""
    def check(text):
        value = _finite(text)
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected a number between {lo} and {hi}, got {text!r}")
        return value
    check.__name__ = f"float_in_{lo}_{hi}"
    check.bounds = (lo, hi)
    return check


def device(text):
    """type= validator for --device: cuda, cuda:N, cpu or mps, usable on this machine (ldm.util.resolve_device)."""
    from ldm.util import UserError, resolve_device

    try:
        resolve_device(text, activate=False)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


# every validator above, for tests that walk a parser's actions (tests/scripts/test_cli_property.py)
VALIDATORS = (positive_int, nonneg_int, finite_float, positive_float, nonneg_float, probability, device)
