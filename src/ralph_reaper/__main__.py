"""``python -m ralph_reaper`` is the ``ralph-reaper`` command."""

import sys

from .cli import main

sys.exit(main())
