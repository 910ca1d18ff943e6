"""The errors auxwrap raises: one base class, one subclass per step of the way through the code.

Every message names the module, fusion point or argument at fault and the fix to try. Also here: what
counts as a number in an argument (:func:`is_integer`, :func:`is_real`), the one rule every check uses.
"""

from __future__ import annotations

import numbers


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
