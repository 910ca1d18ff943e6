"""Optional packages: imported where they are needed, and named by the extra that installs them when missing.

``pip install auxwrap`` installs the core (torch, timm, numpy); ``pip install 'auxwrap[demo]'`` adds what
``python -m auxwrap demo`` and :func:`auxwrap.plot_gates` need (scikit-learn, tqdm, matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import AuxwrapError

#: pip's name of a distribution where it differs from the module it installs
PACKAGES = {"sklearn": "scikit-learn"}


class AuxwrapMissingDependencyError(AuxwrapError, ImportError):
    """An optional package auxwrap needs for this call is not installed (or fails to import)."""


def require(module: str, *, extra: str, purpose: str) -> ModuleType:
    """Import and return ``module``, or raise :class:`AuxwrapMissingDependencyError` naming the extra to install.

    Args:
        module: a dotted module name, e.g. ``"sklearn.datasets"``.
        extra: the auxwrap extra that installs it, e.g. ``"demo"`` (``pip install 'auxwrap[demo]'``).
        purpose: what needs it, the subject of the message, e.g. ``"python -m auxwrap demo"``.
    """
    top = module.partition(".")[0]
    package = PACKAGES.get(top, top)
    try:
        importlib.import_module(top)  # first: a cached submodule must not hide a missing (or blocked) package
        return importlib.import_module(module)
    except ImportError as error:
        missing = isinstance(error, ModuleNotFoundError) and error.name in (top, module)
        state = "which is not installed" if missing else f"which fails to import ({error})"
        raise AuxwrapMissingDependencyError(
            f"{purpose} needs {package} (module {top}), {state}: pip install 'auxwrap[{extra}]' "
            f"(or pip install {package})", name=top) from error
