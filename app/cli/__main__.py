"""``python -m app.cli``: the ``x402-proxy`` command without its console script."""

import sys

from app.cli import main

sys.exit(main())
