"""``python -m dagpre`` runs the ``dagpre`` command."""

import sys

from dagpre.cli import main

sys.exit(main())
