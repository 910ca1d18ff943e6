"""The errors auxwrap raises: one base class, one subclass per step of the way through the code.

Every message names the module, fusion point or argument at fault and the fix to try. Also here: what
counts as a number in an argument (:func:`is_integer`, :func:`is_real`) and the checks every module makes
of its arguments with them (:func:`check_int`, :func:`check_real`, :func:`check_choice`), each the one
definition of its rule and of its message.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Sequence


def is_integer(value: object) -> bool:
    """An integer of any kind: ``int`` and numpy's integer scalars (``numbers.Integral``), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """A real number of any kind: ``int``, ``float``, numpy's scalars (``numbers.Real``), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class AuxwrapError(Exception):
    """Base class of every error auxwrap raises on purpose."""


class AuxwrapArgumentError(AuxwrapError, TypeError, ValueError):
    """An argument has the wrong type or value (not a module, bad example inputs, unknown option)."""


class AuxwrapTraceError(AuxwrapError):
    """torch.fx could not trace a model.

    ``module_path`` and ``module_type`` name the innermost module being traced when it failed
    (``""`` and the model's class when the failure is in the model's own ``forward``).
    """

    def __init__(self, message: str, module_path: str = "", module_type: type | None = None):
        super().__init__(message)
        self.module_path = module_path
        self.module_type = module_type


class AuxwrapTapError(AuxwrapError):
    """Fusion points (taps) could not be found or resolved."""


def argument_error(name: str, value: object, allowed: str, why: str = "", fix: str = "") -> AuxwrapArgumentError:
    """``{name} must be {allowed} ({why}), got {value!r}; {fix}.``: the argument, what it may be and why, what
    was received and what to pass instead (``why`` and ``fix`` left out where empty)."""
    return AuxwrapArgumentError(f"{name} must be {allowed}{f' ({why})' if why else ''}, got {value!r}"
                                f"{f'; {fix}' if fix else ''}.")


def check_int(name: str, value: object, minimum: int, maximum: int | None = None, *, allowed: str = "",
              why: str = "", fix: str = "") -> int:
    """``value`` as an ``int`` where it is an integer (:func:`is_integer`) in [``minimum``, ``maximum``];
    else an :func:`argument_error` saying so (``allowed`` rewords "an int >= minimum")."""
    if not is_integer(value) or value < minimum or (maximum is not None and value > maximum):
        span = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
        raise argument_error(name, value, allowed or span, why, fix)
    return int(value)


def check_real(name: str, value: object, low: float | None = None, high: float | None = None, *,
               low_open: bool = False, high_open: bool = False, allowed: str = "", why: str = "",
               fix: str = "") -> float:
    """``value`` as a ``float`` where it is a finite real number (:func:`is_real`) between ``low`` and ``high``
    (either bound left out where None, excluded where ``low_open`` / ``high_open``); else an
    :func:`argument_error` saying so (``allowed`` rewords the generated range, e.g. "a finite number >= 0")."""
    if not is_real(value) or not math.isfinite(value) or not _within(value, low, high, low_open, high_open):
        raise argument_error(name, value, allowed or _span(low, high, low_open, high_open), why, fix)
    return float(value)


def check_choice(name: str, value: object, choices: Sequence[object], *, fix: str = "") -> object:
    """``value`` where it is one of ``choices``; else ``unknown {name} {value!r}; {fix}.`` (by default the fix
    lists the choices)."""
    if not (isinstance(value, Hashable) and value in choices):
        fix = fix or f"use one of {', '.join(map(repr, choices))}"
        raise AuxwrapArgumentError(f"unknown {name} {value!r}; {fix}.")
    return value


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _span(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    """What :func:`check_real` allows, in words: "a finite number > 0", "a number in [0, 1]"..."""
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"a finite number {'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"a finite number {'<' if high_open else '<='} {high:g}"
    return "a finite number"
