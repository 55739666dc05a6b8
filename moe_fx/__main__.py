"""``python -m moe_fx`` runs the CLI."""

import sys

from moe_fx.cli import main

sys.exit(main())
