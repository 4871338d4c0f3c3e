import sys

from pgsim.cli.main import main

sys.exit(main())
