"""``python -m pgsim.cli``: the ``pgsim`` command."""

import sys

from pgsim.cli.main import main

sys.exit(main())
