"""python -m auxwrap: the command line of auxwrap.cli (python -m auxwrap --help lists the commands)."""

from .cli import main

raise SystemExit(main())
