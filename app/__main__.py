"""``python -m app``: the ``joulegate`` command."""

import sys

from app.cli import main

sys.exit(main())
