"""``python -m core.explain``: see :mod:`core.explain.cli`."""

import sys

from core.explain.cli import main

sys.exit(main())
