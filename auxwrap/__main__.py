"""``python -m auxwrap``: see :mod:`auxwrap.cli`."""

from .cli import main

raise SystemExit(main())
