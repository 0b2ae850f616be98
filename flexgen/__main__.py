"""``python -m flexgen``: the same commands as the ``flexgen`` console script, for a checkout used
without installing it (``PYTHONPATH=.``) or an interpreter whose scripts folder is not on PATH."""

import sys

from flexgen.cli import main

sys.exit(main())
