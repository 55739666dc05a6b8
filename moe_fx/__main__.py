"""``python -m moe_fx`` runs the CLI."""

import sys

from .cli import main

sys.exit(main())
