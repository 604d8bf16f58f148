"""``python -m regsync``: the same command as the ``regsync`` entry point."""

import sys

from .cli import main

sys.exit(main())
