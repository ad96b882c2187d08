"""``python -m lmmops`` runs the command-line tool."""

import sys

from lmmops.cli import main

sys.exit(main())
