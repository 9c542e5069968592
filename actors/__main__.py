"""``python -m actors``: the ``bide`` command line."""

import sys

from actors.apps.cli import main

sys.exit(main())
