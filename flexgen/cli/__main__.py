"""``python -m flexgen.cli``: the same commands as ``flexgen`` (and ``python -m flexgen``)."""

import sys

from flexgen.cli import main

sys.exit(main())
