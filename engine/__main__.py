# PYTHON_ARGCOMPLETE_OK  (argcomplete's global completion of `python -m engine` looks for it)
"""`python -m engine` runs the command line."""

from engine.cli import main

raise SystemExit(main())
